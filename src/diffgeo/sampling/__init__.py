"""The one place that steps through time: grids, the DDIM step, the sampling loop.

``Grid`` (from the model's scheduler config) says which timesteps a run visits; ``ddim`` holds
the step's formulas; ``loop`` the loops (:func:`sample` down the grid, :func:`ascend` up it) and
the verbs built on them (:func:`invert`, :func:`generate`, :func:`reconstruct`, :func:`walk`).
"""

from diffgeo.sampling.ddim import (
    clip_eps,
    ddim_step,
    eps_from_x0,
    noised,
    predict_x0,
    renoised,
    step_coefficients,
)
from diffgeo.sampling.grid import (
    DEFAULT_STEPS,
    Grid,
    GridRule,
    alpha_bar,
    grid_timesteps,
    signal_noise,
    step_coefficients_at,
    step_output,
)
from diffgeo.sampling.loop import (
    Guidance,
    Step,
    Trajectory,
    ascend,
    eps_model,
    generate,
    invert,
    predict_clean,
    reconstruct,
    sample,
    walk,
)

__all__ = [
    "DEFAULT_STEPS", "Grid", "GridRule", "Guidance", "Step", "Trajectory", "alpha_bar", "ascend",
    "clip_eps", "ddim_step", "eps_from_x0", "eps_model", "generate", "grid_timesteps", "invert",
    "noised", "predict_clean", "predict_x0", "reconstruct", "renoised", "sample", "signal_noise",
    "step_coefficients", "step_coefficients_at", "step_output", "walk",
]
