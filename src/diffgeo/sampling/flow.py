"""Flow matching (SD3, FLUX): the grid rule read from the scheduler config and the Euler step.

Calling convention (the flow half of ``diffgeo.sampling``):

    x_σ = (1 − σ)·x0 + σ·ε,   σ ∈ [0, 1] (0 = clean),   the network predicts v = ε − x0
    x̂0 = x − σ·v,   ε̂ = x + (1 − σ)·v
    Euler step σ → σ':  x' = x + (σ' − σ)·v  =  (1 − σ')·x̂0 + σ'·ε̂

The last form is the DDIM step with (signal, noise) coefficients (1 − σ, σ) in place of
(√ᾱ, √(1 − ᾱ)): both keep the model's (x̂0, ε̂) and re-mix them at the next level, so the loop
(:mod:`diffgeo.sampling.loop`) runs both families with the same structure and the same exact
inversion (a fixed point per step), choosing the step by the grid's family.

Timesteps. A flow grid's levels are the scheduler's *model times* τ = σ·T (T =
``num_train_timesteps``): Python floats in float64, the numbers diffusers' pipelines pass to the
transformer, so σ = τ / T everywhere (:func:`sigma_of`). They are floats because the scheduler's
shifted sigmas (``shift``, ``use_dynamic_shifting`` with the pipelines' image-sequence-length
``mu``) lie on no integer grid; rounding them would move every step off diffusers'. Paper
defaults such as t = 700 still land through ``Grid.nearest`` (τ has the DDPM t's scale). The
DDPM path keeps its integer timesteps: floats appear only on grids whose rule is a
:class:`FlowRule`. The clean level is ``None`` (σ = 0), as on DDPM grids.

The sigmas themselves come from diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``
called the way each pipeline calls it (SD3: the scheduler's own linspace; FLUX: custom sigmas
``linspace(1, 1/N, N)``; both: ``mu = calculate_shift(image_seq_len, ...)`` under dynamic
shifting), never re-derived here.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffgeo.errors import InputError

#: How a pipeline family asks the scheduler for its sigmas (see the module docstring).
PIPELINE_SIGMAS = ("scheduler", "flux")
_UNSUPPORTED = ("invert_sigmas", "stochastic_sampling")


@dataclass(frozen=True)
class FlowRule:
    """A flow-matching scheduler config plus what the pipeline adds when it sets timesteps.

    ``config_json`` is the scheduler config (JSON text, so the rule stays hashable and is
    recorded verbatim); ``image_seq_len`` is the number of image tokens the transformer sees
    (dynamic shifting's ``mu`` depends on it); ``pipeline_sigmas`` is ``"scheduler"`` (SD3's
    pipeline) or ``"flux"`` (FluxPipeline passes ``linspace(1, 1/N, N)``).
    """

    config_json: str
    image_seq_len: int
    pipeline_sigmas: str = "scheduler"

    def __post_init__(self) -> None:
        if self.pipeline_sigmas not in PIPELINE_SIGMAS:
            raise InputError(f"pipeline_sigmas must be one of {PIPELINE_SIGMAS}, "
                             f"got {self.pipeline_sigmas!r}")
        if isinstance(self.image_seq_len, bool) or not isinstance(self.image_seq_len, int) \
                or self.image_seq_len < 1:
            raise InputError(f"image_seq_len must be an integer >= 1, got {self.image_seq_len!r}")
        cfg = self.config
        for key in _UNSUPPORTED:
            if cfg.get(key):
                raise InputError(f"scheduler config sets {key}: diffgeo's flow solver is the "
                                 "deterministic Euler step on sigmas falling to 0")

    @classmethod
    def from_config(cls, config: dict[str, Any], image_seq_len: int,
                    pipeline_sigmas: str = "scheduler") -> FlowRule:
        return cls(json.dumps(dict(config), sort_keys=True), int(image_seq_len), pipeline_sigmas)

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @functools.cached_property
    def num_train_timesteps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    def mu(self) -> float | None:
        """Dynamic shifting's mu as the pipelines compute it (None without dynamic shifting)."""
        cfg = self.config
        if not cfg.get("use_dynamic_shifting"):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return float(calculate_shift(self.image_seq_len, cfg.get("base_image_seq_len", 256),
                                     cfg.get("max_image_seq_len", 4096),
                                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)))

    def scheduler(self, num_steps: int):
        """diffusers' scheduler with the pipeline's ``set_timesteps`` call done."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        sigmas = (np.linspace(1.0, 1 / num_steps, num_steps)
                  if self.pipeline_sigmas == "flux" and not self.config.get("use_flow_sigmas")
                  else None)
        sched.set_timesteps(num_steps, sigmas=sigmas, mu=self.mu())
        return sched

    def to_dict(self) -> dict[str, Any]:
        return {"flow": self.config, "image_seq_len": self.image_seq_len,
                "pipeline_sigmas": self.pipeline_sigmas}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowRule:
        return cls.from_config(data["flow"], int(data["image_seq_len"]),
                               data.get("pipeline_sigmas", "scheduler"))


def flow_timesteps(rule: FlowRule, num_steps: int) -> list[float]:
    """The ascending model times τ = σ·T of an ``num_steps``-step run (the clean end excluded)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) \
            or not 1 <= num_steps <= rule.num_train_timesteps:
        raise InputError(f"steps must be an integer in 1..{rule.num_train_timesteps}, "
                         f"got {num_steps!r}")
    sigmas = rule.scheduler(int(num_steps)).sigmas[:-1].double()
    T = rule.num_train_timesteps
    taus = sorted(float(s) * T for s in sigmas)
    if len(set(taus)) != len(taus) or taus[0] <= 0 or taus[-1] > T:
        raise InputError(f"{num_steps} steps give repeated or out-of-range sigmas "
                         f"{[t / T for t in taus]}")
    return taus


def check_time(value: Any, name: str) -> int | float:
    """A timestep as given: an integer >= 0 stays an int (DDPM grids, and the nominal t of a
    flow run), a finite float >= 0 stays a float (a flow grid's model time σ·T); grids then
    check it against their levels. Bools and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InputError(f"{name} must be a timestep (a number >= 0), got {value!r}")
    if not np.isfinite(float(value)) or value < 0:
        raise InputError(f"{name} must be >= 0, got {value}")
    return int(value) if isinstance(value, int | np.integer) else float(value)


def time_value(t: Any) -> int | float:
    """A level as a plain Python number: an int for integer timesteps (tensors included), a
    float for flow model times."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1)[0].item()
    return float(t) if isinstance(t, float | np.floating) else int(t)


def sigma_of(tau: float | None, num_train_timesteps: int) -> float:
    """σ of a flow level: τ / T, or 0 at the clean level (None)."""
    return 0.0 if tau is None else float(tau) / num_train_timesteps


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow's forward process: (1 − σ)·x0 + σ·noise (the scheduler's ``scale_noise``)."""
    return (1 - sigma) * x0 + sigma * noise


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """x̂0 = x − σ·v."""
    return x - sigma * v


def eps_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """ε̂ = x + (1 − σ)·v."""
    return x + (1 - sigma) * v


def velocity_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """v from ε̂ (undefined at σ = 1, where ε̂ = x carries no information about v)."""
    if sigma >= 1:
        raise InputError("the velocity cannot be recovered from ε at sigma = 1")
    return (eps - x) / (1 - sigma)


def flow_step(x: torch.Tensor, v: torch.Tensor, sigma_from: float, sigma_to: float, *,
              v_x0: torch.Tensor | None = None) -> torch.Tensor:
    """The Euler step σ_from → σ_to (either direction): x + (σ_to − σ_from)·v.

    ``v_x0`` (default ``v``) is the velocity of the x̂0 term, ``v`` that of the ε̂ term
    (Asyrp's asymmetric step in the velocity parameterisation):
    (1 − σ_to)·(x − σ_from·v_x0) + σ_to·(x + (1 − σ_from)·v), evaluated as
    x + (σ_to − σ_from)·v − (1 − σ_to)·σ_from·(v_x0 − v) so that v_x0 = v is the plain step
    bit for bit (diffusers' ``sample + dt * model_output``).
    """
    out = x + (sigma_to - sigma_from) * v
    if v_x0 is not None:
        out = out - ((1 - sigma_to) * sigma_from) * (v_x0 - v)
    return out


__all__ = ["PIPELINE_SIGMAS", "FlowRule", "check_time", "eps_from_velocity", "flow_noised",
           "flow_step", "flow_timesteps", "sigma_of", "time_value", "velocity_from_eps",
           "x0_from_velocity"]
