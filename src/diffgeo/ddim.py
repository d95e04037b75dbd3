"""Transitional alias of :mod:`diffgeo.sampling` under its old name (being removed)."""

from __future__ import annotations

import torch

from diffgeo.backbones.base import Backbone
from diffgeo.sampling import (
    Grid,
    GridRule,
    Trajectory,
    alpha_bar,
    generate,
    grid_timesteps,
    invert,
    reconstruct,
    step_coefficients,
    walk,
)
from diffgeo.schedule import SPACINGS

__all__ = ["SPACINGS", "Trajectory", "alpha_bar", "ddim_grid", "generate", "grid_up_to",
           "invert", "reconstruct", "step_coefficients", "walk"]


def ddim_grid(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
              offset: int = 0) -> list[int]:
    return grid_timesteps(num_train_timesteps, num_steps, GridRule(spacing, offset))


def grid_up_to(backbone: Backbone, t_stop: int, num_steps: int, spacing: str | None = None,
               offset: int | None = None) -> list[int]:
    return list(Grid.for_model(backbone, num_steps, spacing=spacing,
                               steps_offset=offset).up_to(t_stop).timesteps)


def ddim_step(backbone: Backbone, x: torch.Tensor, t_from: int | None, t_to: int | None,
              eps: torch.Tensor) -> torch.Tensor:
    a, b = step_coefficients(alpha_bar(backbone, t_from), alpha_bar(backbone, t_to))
    return a * x + b * eps
