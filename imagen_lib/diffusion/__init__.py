"""Diffusion maths: the two processes (EDM and continuous-time VP), noise and schedules, samplers,
guidance and noise-conditioning augmentation. Networks arrive as callables; nothing here imports a network.
"""

from imagen_lib.diffusion.processes import (
                                            DIFFUSIONS,
                                            ElucidatedDiffusion,
                                            GaussianDiffusionContinuous,
                                            diffusion_from_config,
)

__all__ = ["DIFFUSIONS", "ElucidatedDiffusion", "GaussianDiffusionContinuous", "diffusion_from_config"]
