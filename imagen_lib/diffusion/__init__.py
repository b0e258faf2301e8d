"""Diffusion maths: the processes (EDM and continuous-time VP in :mod:`.processes`, Stable Diffusion's discrete
DDPM schedule in :mod:`.discrete`), reproducible noise (:mod:`.noise`), schedules (:mod:`.schedules`),
samplers (:mod:`.samplers`), guidance and noise-conditioning augmentation. Networks arrive as callables;
nothing here imports a network.
"""

from imagen_lib.diffusion.discrete import DiscreteDiffusion  # registers itself in DIFFUSIONS
from imagen_lib.diffusion.processes import (
                                            DIFFUSIONS,
                                            ElucidatedDiffusion,
                                            GaussianDiffusionContinuous,
                                            diffusion_from_config,
                                            diffusion_kind,
                                            register_diffusion,
)

__all__ = ["DIFFUSIONS", "DiscreteDiffusion", "ElucidatedDiffusion", "GaussianDiffusionContinuous",
           "diffusion_from_config", "diffusion_kind", "register_diffusion"]
