"""Jacobian-vector and vector-Jacobian products of ε and of the bottleneck h w.r.t. the state.

Every product runs inside ``backbone.derivative_mode()`` (math attention, contiguous GroupNorm
inputs), so forward-mode AD works through diffusers U-Nets. Batched products stack the K
directions along the batch axis — one network call for all K, which needs no vmap support from
the model — in chunks of ``chunk`` directions to bound memory.

Precision: derivatives are taken in the backbone's dtype; pass float64 states to a float64
backbone (``load_backbone(..., dtype="float64")``) for reference values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.errors import InputError

OUTPUTS = ("eps", "h")  # and "velocity" on flow-matching models


def output_fn(backbone: Backbone, t: int | torch.Tensor, cond: Conditioning | None = None,
              output: str = "eps") -> Callable[[torch.Tensor], torch.Tensor]:
    """x ↦ ε(x, t), h(x, t) or (flow-matching models) the velocity v(x, t), as a plain
    function of the state."""
    if output == "eps":
        return lambda x: backbone.eps(x, t, cond)
    if output == "velocity":
        if backbone.prediction_type != "flow":
            raise InputError("output 'velocity' needs a flow-matching model")
        return lambda x: backbone.velocity(x, t, cond)  # type: ignore[attr-defined]
    if output == "h":
        return lambda x: backbone.h(x, t, cond)
    raise InputError(f"output must be one of {OUTPUTS}, got {output!r}")


def _check(backbone: Backbone, x: torch.Tensor, direction: torch.Tensor | None,
           name: str) -> None:
    backbone.check_state(x)
    if x.dtype != backbone.dtype:
        raise InputError(f"x is {x.dtype} but the backbone runs in {backbone.dtype}: load it with "
                         f"dtype={str(x.dtype).replace('torch.', '')!r} or cast x")
    if direction is not None and direction.shape[-x.ndim:] != x.shape:
        raise InputError(f"{name} must have the shape of x {tuple(x.shape)} (optionally with a "
                         f"leading batch of directions), got {tuple(direction.shape)}")
    _check_finite(x, "x")
    if direction is not None:
        _check_finite(direction, name)


def _check_finite(value: torch.Tensor, name: str) -> None:
    # a NaN in would come out as a NaN derivative, silently
    if not bool(torch.isfinite(value).all()):
        raise InputError(f"{name} contains NaN or infinite values")


def jvp(backbone: Backbone, x: torch.Tensor, v: torch.Tensor, t: int | torch.Tensor,
        cond: Conditioning | None = None, output: str = "eps"
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), Df(x)[v]) for f = ε or h; v has the shape of x (use batched_jvp for several)."""
    if v.shape != x.shape:
        raise InputError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)} "
                         "(for several directions use batched_jvp)")
    _check(backbone, x, v, "v")
    f = output_fn(backbone, t, cond, output)
    with backbone.derivative_mode():
        # forward-mode AD refuses a broadcast (expanded) primal; contiguous() copies only then
        return _jvp(f, (x.contiguous(),), (v.to(x).contiguous(),))


def vjp(backbone: Backbone, x: torch.Tensor, u: torch.Tensor, t: int | torch.Tensor,
        cond: Conditioning | None = None, output: str = "eps"
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), Df(x)ᵀ[u]) for f = ε or h; u has the shape of f(x)."""
    _check(backbone, x, None, "u")
    _check_finite(u, "u")
    f = output_fn(backbone, t, cond, output)
    with backbone.derivative_mode():
        out, pullback = _vjp(f, x)
        if u.shape != out.shape:
            raise InputError(f"u must have the shape of {output}(x) {tuple(out.shape)}, "
                             f"got {tuple(u.shape)}")
        (g,) = pullback(u.to(out).contiguous())
    return out, g


def _repeat(x: torch.Tensor, k: int) -> torch.Tensor:
    # A real copy: an expanded view has stride 0 for a batch of one, which forward AD refuses.
    return x.repeat(k, *([1] * (x.ndim - 1)))


def _expand_cond(cond: Conditioning | None, batch: int, k: int) -> Conditioning | None:
    if cond is None:
        return None
    c = cond.expand(batch)
    from dataclasses import replace

    rep = lambda v: None if v is None else _repeat(v, k)  # noqa: E731
    return replace(c, encoder_hidden_states=rep(c.encoder_hidden_states),
                   added={key: _repeat(val, k) for key, val in c.added.items()},
                   class_labels=rep(c.class_labels))


def batched_jvp(backbone: Backbone, x: torch.Tensor, V: torch.Tensor, t: int | torch.Tensor,
                cond: Conditioning | None = None, output: str = "eps", chunk: int = 16
                ) -> torch.Tensor:
    """Df(x)[V_k] for K directions V of shape (K, *x.shape): returns (K, *f(x).shape)."""
    _check(backbone, x, V, "V")
    if V.ndim != x.ndim + 1:
        raise InputError(f"V must have shape (K, {', '.join(map(str, x.shape))}), "
                         f"got {tuple(V.shape)}")
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    B = x.shape[0]
    outs = []
    tt = backbone.timesteps(t, B)
    for s in range(0, V.shape[0], chunk):
        Vc = V[s:s + chunk].to(x)
        k = Vc.shape[0]
        f = output_fn(backbone, _repeat(tt, k), _expand_cond(cond, B, k), output)
        with backbone.derivative_mode():
            _, jv = _jvp(f, (_repeat(x, k),), (Vc.reshape(k * B, *x.shape[1:]).contiguous(),))
        outs.append(jv.reshape(k, B, *jv.shape[1:]))
    return torch.cat(outs)


def batched_vjp(backbone: Backbone, x: torch.Tensor, U: torch.Tensor, t: int | torch.Tensor,
                cond: Conditioning | None = None, output: str = "eps", chunk: int = 16
                ) -> torch.Tensor:
    """Df(x)ᵀ[U_k] for K cotangents U of shape (K, *f(x).shape): returns (K, *x.shape)."""
    _check(backbone, x, None, "U")
    _check_finite(U, "U")
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    B = x.shape[0]
    tt = backbone.timesteps(t, B)
    outs = []
    for s in range(0, U.shape[0], chunk):
        Uc = U[s:s + chunk]
        k = Uc.shape[0]
        f = output_fn(backbone, _repeat(tt, k), _expand_cond(cond, B, k), output)
        with backbone.derivative_mode():
            out, pullback = _vjp(f, _repeat(x, k))
            if Uc.shape[2:] != out.shape[1:] or Uc.shape[1] != B:
                raise InputError(f"U must have shape (K, {B}, {', '.join(map(str, out.shape[1:]))})"
                                 f", got {tuple(U.shape)}")
            (g,) = pullback(Uc.reshape(out.shape).to(out).contiguous())
        outs.append(g.reshape(k, *x.shape))
    return torch.cat(outs)


def central_difference(backbone: Backbone, x: torch.Tensor, v: torch.Tensor,
                       t: int | torch.Tensor, cond: Conditioning | None = None,
                       output: str = "eps", step: float = 0.03) -> torch.Tensor:
    """(f(x + s·v) − f(x − s·v)) / 2s for a batch of B states and B directions, both (B, *state):
    one network call on 2B states, differentiable with respect to ``x`` by ordinary reverse mode.

    A cheaper stand-in for ``jvp`` where its O(s²) error is acceptable: it needs no forward-mode
    AD, so the model runs as it does for sampling (its fast attention kernels included) and a
    gradient through it is a plain backward pass instead of reverse-over-forward. Meant for the
    model's dtype float32 or float64: the rounding error grows like ulp·|f|/s."""
    if v.shape != x.shape:
        raise InputError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    if not 0 < step < float("inf"):
        raise InputError(f"step must be a finite number > 0, got {step}")
    _check(backbone, x, v, "v")
    B = x.shape[0]
    tt = backbone.timesteps(t, B)
    f = output_fn(backbone, _repeat(tt, 2), _expand_cond(cond, B, 2), output)
    v = v.to(x)
    out = f(torch.cat([x + step * v, x - step * v]))
    return (out[:B] - out[B:]) / (2 * step)


@torch.no_grad()
def finite_difference(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      v: torch.Tensor, step: float = 1e-3) -> torch.Tensor:
    """Central difference (f(x + s·v) - f(x - s·v)) / 2s, the oracle for every derivative."""
    return (f(x + step * v) - f(x - step * v)) / (2 * step)
