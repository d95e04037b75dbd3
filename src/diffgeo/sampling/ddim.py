"""One DDIM step (Eq. 4 of the generation-curves paper; Song et al. 2021, Eq. 12) and its parts.

Calling convention: states are tensors, alpha_bar values are float64 Python floats (``ab_from``
is the level the step starts at, ``ab_to`` the one it reaches; either direction). Everything
that steps through time — generation, inversion, RBE's asymmetric edit, PIXELS, the RePaint
baseline, curve matching — uses these functions, so each formula is written once:

    x̂0 = (x − sqrt(1 − ab_from)·ε_x0) / sqrt(ab_from)
    x_to = sqrt(ab_to)·x̂0 + sqrt(1 − ab_to − σ²)·ε_dir + σ·z,
    σ = η·sqrt((1 − ab_to)/(1 − ab_from)·(1 − ab_from/ab_to))

With ε_x0 = ε_dir = ε and η = 0 this is x_to = A·x + B·ε (Eq. 8's A(t), B(t)); Asyrp's
asymmetric step takes ε_x0 from an edited bottleneck and ε_dir from the original one.
"""

from __future__ import annotations

import torch

from diffgeo.errors import InputError


def step_coefficients(ab_from: float, ab_to: float) -> tuple[float, float]:
    """A, B with x_to = A·x_from + B·ε (Eq. 4 rearranged; Eq. 8's A(t), B(t))."""
    a = (ab_to / ab_from) ** 0.5
    b = (1 - ab_to) ** 0.5 - (ab_to * (1 - ab_from) / ab_from) ** 0.5
    return a, b


def predict_x0(x: torch.Tensor, eps: torch.Tensor, ab: float) -> torch.Tensor:
    """x̂0 = (x − sqrt(1 − ab)·ε) / sqrt(ab)."""
    return (x - (1 - ab) ** 0.5 * eps) / ab**0.5


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, ab: float) -> torch.Tensor:
    """The ε that makes (x̂0, ε) consistent at x: (x − sqrt(ab)·x̂0) / sqrt(1 − ab)."""
    return (x - ab**0.5 * x0) / (1 - ab) ** 0.5


def clip_eps(x: torch.Tensor, eps: torch.Tensor, ab: float, limit: float = 1.0) -> torch.Tensor:
    """ε recomputed from x̂0 clamped to [−limit, limit], so the step stays a DDIM step of a
    consistent (x̂0, ε) pair (how pixel DDPMs are sampled: their schedulers set clip_sample)."""
    return eps_from_x0(x, predict_x0(x, eps, ab).clamp(-limit, limit), ab)


def noised(x0: torch.Tensor, noise: torch.Tensor, ab: float) -> torch.Tensor:
    """The forward process q(x_t | x_0): sqrt(ab)·x0 + sqrt(1 − ab)·noise."""
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * noise


def renoised(x_to: torch.Tensor, noise: torch.Tensor, ab_from: float,
             ab_to: float) -> torch.Tensor:
    """q(x_from | x_to) for ab_from < ab_to: back up one level with fresh noise (RePaint)."""
    ratio = ab_from / ab_to
    return ratio**0.5 * x_to + (1 - ratio) ** 0.5 * noise


def ddim_sigma(eta: float, ab_from: float, ab_to: float) -> float:
    """DDIM's σ for a generation step (ab_from < ab_to)."""
    return eta * ((1 - ab_to) / (1 - ab_from) * (1 - ab_from / ab_to)) ** 0.5


def ddim_step(x: torch.Tensor, eps: torch.Tensor, ab_from: float, ab_to: float, *,
              eps_x0: torch.Tensor | None = None, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Move x from alpha_bar ``ab_from`` to ``ab_to`` with the direction term's ε = ``eps``.

    ``eps_x0`` (default ``eps``) is the ε of the x̂0 term (Asyrp's asymmetric step). The
    deterministic step is evaluated as A·x + B·ε + C·(ε_x0 − ε) with
    C = −sqrt(ab_to)·sqrt(1 − ab_from)/sqrt(ab_from): the same number as the x̂0 form,
    arranged so that ε_x0 = ε gives A·x + B·ε bit for bit. ``eta`` > 0 (generation steps only)
    adds σ·``noise``, which the caller draws from an explicit generator.
    """
    if eta == 0:
        a, b = step_coefficients(ab_from, ab_to)
        out = a * x + b * eps
        if eps_x0 is not None:
            out = out + (-(ab_to**0.5) * (1 - ab_from) ** 0.5 / ab_from**0.5) * (eps_x0 - eps)
        return out
    if noise is None:
        raise InputError("a stochastic DDIM step (eta > 0) needs its noise")
    if ab_to < ab_from:
        raise InputError("eta > 0 applies to generation steps only")
    sigma = ddim_sigma(eta, ab_from, ab_to)
    x0 = predict_x0(x, eps if eps_x0 is None else eps_x0, ab_from)
    return ab_to**0.5 * x0 + (1 - ab_to - sigma**2) ** 0.5 * eps + sigma * noise


__all__ = ["clip_eps", "ddim_sigma", "ddim_step", "eps_from_x0", "noised", "predict_x0",
           "renoised", "step_coefficients"]
