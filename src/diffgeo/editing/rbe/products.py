"""The derivatives RBE takes: products with J = ∂(weight ⊙ ε)/∂h through the decoder only
(the encoder's skips cached), the Eq. 14 projection, and the first-order response of a
direction inside and outside the region."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp

from diffgeo.backbones.base import Backbone, Conditioning, Encoded
from diffgeo.editing.rbe.config import check_state
from diffgeo.errors import DiffgeoError, InputError, check_int


def _repeat_encoded(enc: Encoded, b: int) -> Encoded:
    """The batch-1 encoder output repeated to batch b (real copies: forward AD refuses the
    stride-0 views that ``expand`` makes)."""
    if b == 1:
        return enc

    def rep(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 1:
            return v.repeat(b, *([1] * (v.ndim - 1)))
        return v

    cond = enc.cond.expand(b) if enc.cond is not None else None
    if cond is not None:
        cond = replace(cond, encoder_hidden_states=rep(cond.encoder_hidden_states),
                       added={k: rep(v) for k, v in cond.added.items()},
                       class_labels=rep(cond.class_labels))
    return replace(enc, h=rep(enc.h), skips=tuple(rep(s) for s in enc.skips), emb=rep(enc.emb),
                   timesteps=rep(enc.timesteps), x=rep(enc.x), cond=cond,
                   extra={k: rep(v) for k, v in enc.extra.items()})


def decoder_products(backbone: Backbone, enc: Encoded, weight: torch.Tensor | None = None,
                     chunk: int = 16
                     ) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                Callable[[torch.Tensor], torch.Tensor]]:
    """Closures V ↦ J V and W ↦ Jᵀ W for J = ∂(weight ⊙ ε(h))/∂h at h = enc.h.

    ε(h) = to_eps(decode(enc, h)): the decoder only, on the cached skips of ``enc`` (a batch-1
    encoder output). V has shape (m, *h_shape) and J V shape (m, *state_shape); the m products
    are stacked along the batch axis, ``chunk`` per network call, inside
    ``backbone.derivative_mode()``. ``weight`` (broadcastable to the state, e.g. the state mask)
    multiplies ε; None means the whole ε.
    """
    check_int(chunk, "chunk", 1)
    h0 = enc.h.detach()
    cache: dict[int, Encoded] = {}

    def f(H: torch.Tensor) -> torch.Tensor:
        b = H.shape[0]
        if b not in cache:
            cache[b] = _repeat_encoded(enc, b)
        e = cache[b]
        return backbone.to_eps(backbone.decode(e, H), e.x, e.timesteps)

    def primal(b: int) -> torch.Tensor:
        return h0.repeat(b, *([1] * (h0.ndim - 1)))

    def apply_j(V: torch.Tensor) -> torch.Tensor:
        outs = []
        for s in range(0, V.shape[0], chunk):
            Vc = V[s:s + chunk].to(h0).contiguous()
            with backbone.derivative_mode():
                _, jv = _jvp(f, (primal(Vc.shape[0]),), (Vc,))
            outs.append(jv.detach())
        out = torch.cat(outs)
        return out if weight is None else out * weight

    def apply_jt(W: torch.Tensor) -> torch.Tensor:
        outs = []
        for s in range(0, W.shape[0], chunk):
            Wc = W[s:s + chunk]
            if weight is not None:
                Wc = Wc * weight
            with backbone.derivative_mode():
                _, pullback = _vjp(f, primal(Wc.shape[0]))
                (g,) = pullback(Wc.to(h0).contiguous())
            outs.append(g.detach())
        return torch.cat(outs)

    return apply_j, apply_jt


def project_out(vectors: torch.Tensor, basis: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v - U Uᵀ v) / ‖·‖ for each v in ``vectors`` (k, *shape) against ``basis`` (k_u, *shape).

    ``basis`` must be orthonormal (Ritz vectors are); with one vector this is the paper's
    Eq. 14, v' = v - (v·u₁) u₁. Computed in float64 with a second Gram-Schmidt pass, so the
    result is orthogonal to the basis to round-off even when v is nearly inside it. Returns the
    unit projected vectors (in ``vectors``' dtype) and the norms before normalisation (the sine
    of the angle between v and span(U)); a norm below 1e-8 raises, since v' is then noise.
    """
    k = vectors.shape[0]
    V = vectors.reshape(k, -1).to(torch.float64)
    U = basis.reshape(basis.shape[0], -1).to(V)
    if U.shape[1] != V.shape[1]:
        raise InputError(f"basis vectors have {U.shape[1]} entries, vectors have {V.shape[1]}")
    P = V - (V @ U.T) @ U
    P = P - (P @ U.T) @ U
    norms = P.norm(dim=1)
    if float(norms.min()) < 1e-8:
        i = int(norms.argmin())
        raise DiffgeoError(f"direction {i} lies inside the unmasked subspace (residual norm "
                           f"{float(norms[i]):.1e}): nothing is left after projection; use a "
                           "smaller k_unmasked or project_against='leading'")
    out = (P / norms[:, None]).to(vectors.dtype).reshape(vectors.shape)
    return out.contiguous(), norms


def masked_response(backbone: Backbone, xt: torch.Tensor, t: int, vectors: torch.Tensor,
                    mask_state: torch.Tensor, cond: Conditioning | None = None,
                    chunk: int = 16) -> dict[str, torch.Tensor]:
    """‖M ⊙ Jε v‖ and ‖(1 - M) ⊙ Jε v‖ for each v in ``vectors`` (k, *h_shape), float64.

    Jε = ∂ε/∂h at (X_t, t), decoder only. The ratio outside / inside is the first-order leakage
    of an edit along v out of the region, at the discovery timestep.
    """
    xt = check_state(backbone, xt, "xt")
    with torch.no_grad():
        enc = backbone.encode(xt, t, cond)
    apply_j, _ = decoder_products(backbone, enc, None, chunk)
    jv = apply_j(vectors.to(enc.h).contiguous()).to(torch.float64)
    m = mask_state.to(jv)
    inside = (m * jv).flatten(1).norm(dim=1)
    outside = ((1 - m) * jv).flatten(1).norm(dim=1)
    return {"inside": inside, "outside": outside}
