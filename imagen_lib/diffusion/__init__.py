"""Diffusion maths: the two processes (EDM and continuous-time VP), reproducible noise (:mod:`.noise`),
schedules (:mod:`.schedules`), samplers (:mod:`.samplers`), guidance and noise-conditioning augmentation.
Networks arrive as callables; nothing here imports a network.
"""

from imagen_lib.diffusion.processes import (
                                            DIFFUSIONS,
                                            ElucidatedDiffusion,
                                            GaussianDiffusionContinuous,
                                            diffusion_from_config,
                                            diffusion_kind,
                                            register_diffusion,
)

__all__ = ["DIFFUSIONS", "ElucidatedDiffusion", "GaussianDiffusionContinuous", "diffusion_from_config",
           "diffusion_kind", "register_diffusion"]
