"""Any callable ε(x, t) as a backbone: toy and analytic models for research and tests."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffgeo.backbones.base import Backbone, Conditioning, Encoded
from diffgeo.errors import InputError

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FunctionalBackbone(Backbone):
    """``eps_fn(x, t)`` with optional ``h_fn(x, t)`` and ``eps_from_h_fn(x, t, h)``.

    ``t`` reaches the callables as a long tensor of shape (B,). Without ``h_fn`` the model has no
    bottleneck and h-based methods raise a clear error.
    """

    kind = "functional"

    def __init__(self, eps_fn: EpsFn, alphas_cumprod: torch.Tensor,
                 state_shape: tuple[int, ...], h_fn: EpsFn | None = None,
                 eps_from_h_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                         torch.Tensor] | None = None,
                 name: str = "functional", image_size: tuple[int, int] | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(alphas_cumprod, device, dtype)
        if not callable(eps_fn):
            raise InputError("eps_fn must be callable as eps_fn(x, t)")
        self.eps_fn, self.h_fn, self.eps_from_h_fn = eps_fn, h_fn, eps_from_h_fn
        self._state_shape = tuple(int(s) for s in state_shape)
        self._image_size = image_size or (tuple(self._state_shape[-2:]) if len(
            self._state_shape) >= 2 else (1, self._state_shape[0]))
        self.name = name

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self._state_shape

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size  # type: ignore[return-value]

    def native(self, x, t, cond=None):
        return self.eps_fn(x, self.timesteps(t, x.shape[0]))

    def encode(self, x, t, cond: Conditioning | None = None) -> Encoded:
        if self.h_fn is None:
            raise InputError(f"backbone {self.name!r} has no bottleneck: pass h_fn to "
                             "FunctionalBackbone to use h-based methods")
        tt = self.timesteps(t, x.shape[0])
        return Encoded(h=self.h_fn(x, tt), skips=(), emb=tt, timesteps=tt, x=x, cond=cond)

    def decode(self, enc: Encoded, h: torch.Tensor, return_features: bool = False):
        if self.eps_from_h_fn is None:
            raise InputError(f"backbone {self.name!r} cannot map h back to ε: pass "
                             "eps_from_h_fn to FunctionalBackbone")
        out = self.eps_from_h_fn(enc.x, enc.timesteps, h)
        return (out, [h]) if return_features else out


def linear_gaussian(mean: torch.Tensor, cov: torch.Tensor, alphas_cumprod: torch.Tensor,
                    state_shape: tuple[int, ...] | None = None,
                    dtype: torch.dtype = torch.float64) -> FunctionalBackbone:
    """The exact optimal denoiser for data x0 ~ N(mean, cov): a closed-form oracle.

    With C_t = ab·Σ + (1 - ab)·I, the minimum-MSE noise prediction is
    ε*(x, t) = sqrt(1 - ab) · C_t⁻¹ (x - sqrt(ab)·μ), so the probability-flow ODE and its DDIM
    discretisation are linear and every derivative is known exactly. Its bottleneck h is ε in the
    eigenbasis of Σ (h = Qᵀε), so ε = Q h: h-based code paths have an exact answer too.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    d = mean.numel()
    if cov.shape != (d, d):
        raise InputError(f"cov must be {d}x{d} for a mean of {d} values, got {tuple(cov.shape)}")
    if not torch.allclose(cov, cov.T, atol=1e-10):
        raise InputError("cov must be symmetric")
    lam, Q = torch.linalg.eigh(cov)
    if float(lam.min()) < -1e-10:
        raise InputError("cov must be positive semi-definite")
    lam = lam.clamp_min(0)
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    shape = tuple(state_shape) if state_shape is not None else (d,)

    def coeffs(t: torch.Tensor, like: torch.Tensor):
        ab = ac[t.cpu()].to(like.device)
        # per-sample, per-eigen gain sqrt(1 - ab) / (ab λ + 1 - ab)
        gain = (1 - ab).sqrt()[:, None] / (ab[:, None] * lam.to(like.device) + (1 - ab)[:, None])
        return ab, gain.to(like.dtype)

    def h_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab, gain = coeffs(t, x)
        centred = x.reshape(x.shape[0], -1) - ab.sqrt()[:, None].to(x.dtype) * mean.to(x)
        return gain * (centred @ Q.to(x))

    def eps_from_h(x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return (h @ Q.T.to(h)).reshape(x.shape)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps_from_h(x, t, h_fn(x, t))

    bb = FunctionalBackbone(eps_fn, ac, shape, h_fn=h_fn, eps_from_h_fn=eps_from_h,
                            name="linear-gaussian", dtype=dtype)
    bb.gaussian = {"mean": mean, "cov": cov, "eigenvalues": lam, "eigenvectors": Q}
    return bb
