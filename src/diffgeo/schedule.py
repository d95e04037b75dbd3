"""alpha_bar in float64, read from a diffusers scheduler config.

diffusers computes ``alphas_cumprod`` in float32; the geometry code needs the float64 values of the
same schedule (A(t), B(t) of Eq. 8 are differences of nearby square roots). The formulas below are
the ones named by the config's ``beta_schedule``; tests check them against diffusers' schedulers.
"""

from __future__ import annotations

import json
import math
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
