"""alpha_bar in float64, read from a diffusers scheduler config.

diffusers computes ``alphas_cumprod`` in float32; the geometry code needs the float64 values of the
same schedule (A(t), B(t) of Eq. 8 are differences of nearby square roots). The formulas below are
the ones named by the config's ``beta_schedule``; tests check them against diffusers' schedulers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffgeo.errors import InputError


def alphas_cumprod_from_config(config: dict[str, Any]) -> torch.Tensor:
    T = int(config.get("num_train_timesteps", 1000))
    b0 = float(config.get("beta_start", 1e-4))
    b1 = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
                             dtype=torch.float64)
    else:
        raise InputError(f"beta_schedule {kind!r} is not supported (linear, scaled_linear, "
                         "squaredcos_cap_v2 or trained_betas)")
    ac = torch.cumprod(1 - betas, 0)
    if config.get("rescale_betas_zero_snr"):
        s = ac.sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * s0 / (s0 - sT)
        ac = s**2
        # A terminal alpha_bar of exactly 0 makes ε undefined at t = T-1; keep it tiny instead.
        ac[-1] = max(float(ac[-1]), 4.8973451890853435e-08)
    return ac


def read_scheduler_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"scheduler config not found: {path}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"scheduler config is not valid JSON: {path} ({e})") from e


SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class GridRule:
    """How a model's scheduler lays out a sampling grid: the fields of a diffusers DDIM
    scheduler config that shape it.

    ``spacing`` and ``steps_offset`` place the timesteps (``timestep_spacing``,
    ``steps_offset``); ``set_alpha_to_one`` says whether the clean end of the grid has
    alpha_bar = 1 or the first training alpha_bar (Stable Diffusion configs set it False, so
    their pipelines end at ᾱ_0, not at 1).
    """

    spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
            raise InputError(f"timestep_spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) \
                or self.steps_offset < 0:
            raise InputError(f"steps_offset must be an integer >= 0, got {self.steps_offset!r}")
        if not isinstance(self.set_alpha_to_one, bool):
            raise InputError(f"set_alpha_to_one must be true or false, "
                             f"got {self.set_alpha_to_one!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GridRule:
        """The rule of a scheduler config; absent fields take DDIMScheduler's defaults (a
        DDPMScheduler config, which has no ``set_alpha_to_one``, samples as DDIM would)."""
        return cls(spacing=config.get("timestep_spacing", "leading"),
                   steps_offset=int(config.get("steps_offset", 0) or 0),
                   set_alpha_to_one=bool(config.get("set_alpha_to_one", True)))
