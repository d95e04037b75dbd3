"""Region-based editing (RBE): unsupervised h-space directions for one image region.

The method (the RBE paper, Eq. 11-14, with Asyrp's editing process):

1. **Where.** Invert the image with DDIM to t (default 500, 40 steps over T, eta 0) and take the
   state X_t. Discovery and editing use the *same* integer grid (a ``sampling.Grid``), so the
   state the directions were found at is the state the edit starts from.
2. **What is differentiated.** f(h) = ε(X_t, h): the noise prediction with the bottleneck
   (mid-block output) replaced by h. The encoder does not depend on h, so f is the *decoder* run
   on the encoder's cached skip tensors (``Backbone.encode`` once, then ``decode(enc, h)``,
   converted to ε with ``to_eps``) — the same function the authors' code evaluates with a full
   U-Net pass per product and a hook on the mid block. The saving is the encoder's forward pass
   per product (no tangent flows through it either way): 15-17% of a discovery on the default
   32x32 model, one CPU thread (``benchmarks/rbe_discovery.py``); more where the encoder is a
   larger share of the network.
3. **Masked Jacobians** (Eq. 11-12). J_M = ∂(M ⊙ ε)/∂h and J_U = ∂((1 - M) ⊙ ε)/∂h, with M the
   region mask on the *state* grid. Rule: the image mask (1 = region) is area-averaged onto the
   state's spatial grid (``F.interpolate(mode="area")``; the identity for pixel models, an 8x8
   average for SD latents) and broadcast over channels, so a soft mask weights ε by the fraction
   of each state cell that lies in the region.
4. **Directions.** The k leading right singular vectors of J_M and k_u of J_U, by block power
   iteration on JᵀJ (``tangent.block_power_iteration``: JVPs and VJPs through the decoder only,
   ``torch.func.jvp``/``vjp`` inside ``backbone.derivative_mode()``; QR every pass, a residual
   test with a Davis–Kahan bound on the angle to the exact directions, the sign convention
   "largest |component| positive"; options in one ``tangent.PowerIterationConfig``). Singular
   values are those of J_M itself (ε-units per unit of h).
5. **Projection** (Eq. 14). v' = v - (v·u₁) u₁ against the leading unmasked vector u₁, as the
   paper writes it (``project_against="leading"``), then normalised; ``"subspace"`` removes the
   whole top-k_u unmasked subspace (a stated extension: J_U usually has several directions of
   similar strength, and removing only the first leaves the others in v'); ``"none"`` keeps v
   (the Semdiff-style masked baseline). Each v' keeps the orientation of its v (v'·v > 0), so
   strengths mean the same thing before and after projection. Projected vectors are unit but not
   mutually orthogonal (each is projected on its own, as in the paper).
6. **Editing** (Asyrp's asymmetric reverse process, the paper's Eq. 1-3). At every generation
   step inside the edit window the encoder runs once on the *current* state (no one-step-lagged
   h), and the decoder twice: ε_edit from h + α·v, ε_orig from h. The DDIM step is
   x_{t-1} = sqrt(ab_{t-1})·P_t(ε_edit) + D_t(ε_orig): the edit enters the x̂0 prediction only,
   the direction term keeps the unedited ε (``mode="x0"``, the paper). ``mode="replace"`` uses
   ε_edit in both terms, as the authors' released code does; by Asyrp's Theorem 1 this mostly
   cancels the edit. Outside the window the step is plain DDIM.

Edit window: the paper's main text only says the edited timesteps are "set" (details are in an
appendix we do not have). Directions are found at t_edit alone and the paper argues h-space is
consistent across timesteps, so the default edits every step of the generation from t_edit down
to t = 0 (``window=(0, t_edit)``). A narrower window ``(t_low, t_high)`` edits only steps whose
starting timestep lies in it; steps *below* t_low may then use ``eta`` > 0 (Asyrp's "quality
boosting" by stochastic noise injection), which needs an explicit generator.

Conventions: states (1, *state_shape) in the backbone's dtype; h-vectors (k, *h_shape), unit
norm when flattened; timesteps are integers on the training grid; every random draw takes a
``torch.Generator`` (default: a fresh one seeded 0), so the same call gives the same result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp

from diffgeo.backbones.base import Backbone, Conditioning, Encoded
from diffgeo.backbones.functional import FunctionalBackbone
from diffgeo.errors import DiffgeoError, InputError, OutputExistsError
from diffgeo.metrics import Locality, edit_locality
from diffgeo.sampling import (
    Grid,
    Trajectory,
    alpha_bar,
    ddim_step,
    invert,
    predict_x0,
    sample,
)
from diffgeo.tangent import (
    PowerIterationConfig,
    PowerIterationResult,
    block_power_iteration,
    default_generator,
    power_config,
)

__all__ = [
    "DEFAULT_K", "DEFAULT_POWER", "DEFAULT_STEPS", "DEFAULT_STRENGTH", "DEFAULT_T", "MODES",
    "PROJECTIONS",
    "Directions", "EditResult", "apply_direction", "asymmetric_step",
    "decoder_products", "directions_at", "discover_directions",
    "global_directions", "masked_response", "project_out", "state_mask",
]

DEFAULT_T = 500          # RBE: discovery / edit timestep
DEFAULT_STEPS = 40       # RBE: DDIM steps over T for inversion and generation
DEFAULT_K = 3            # RBE: directions per region
DEFAULT_STRENGTH = 30.0  # RBE: edit scale ±30 on unit h-vectors
# RBE: k = 3, at most 50 passes (the paper); one oversampling vector measures the gap for the
# error bound.
DEFAULT_POWER = PowerIterationConfig(k=DEFAULT_K, max_iter=50)
PROJECTIONS = ("leading", "subspace", "none")
MODES = ("x0", "replace")
MASK_RULE = ("image mask (1 = region) area-averaged onto the state grid "
             "(F.interpolate mode='area'), broadcast over channels")
_FORMAT = "diffgeo-rbe-directions/1"
_TENSORS = "directions.safetensors"
_META = "directions.json"


# ---------------------------------------------------------------------------------- checks


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise InputError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _require_h(backbone: Backbone) -> None:
    """RBE lives in h-space: refuse backbones that cannot expose h or map it back to ε."""
    if not isinstance(backbone, Backbone):
        raise InputError(f"backbone must be a diffgeo Backbone, got {type(backbone).__name__}")
    if isinstance(backbone, FunctionalBackbone):
        if backbone.h_fn is None:
            raise InputError(f"RBE works in h-space, but backbone {backbone.name!r} has no "
                             "bottleneck: pass h_fn (and eps_from_h_fn) to FunctionalBackbone")
        if backbone.eps_from_h_fn is None:
            raise InputError(f"RBE differentiates ε with respect to h, but backbone "
                             f"{backbone.name!r} cannot map h back to ε: pass eps_from_h_fn")


def _check_x0(backbone: Backbone, x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor state of shape "
                         f"(1, {', '.join(map(str, backbone.state_shape))}), "
                         f"got {type(x).__name__}")
    backbone.check_state(x, name)
    if x.shape[0] != 1:
        raise InputError(f"{name} must hold one state (batch 1), got a batch of {x.shape[0]}")
    if x.dtype != backbone.dtype:
        raise InputError(f"{name} is {x.dtype} but the backbone runs in {backbone.dtype}: cast "
                         f"it or load the backbone with "
                         f"dtype={str(x.dtype).replace('torch.', '')!r}")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return x.detach()


def _check_projection(project_against: str) -> str:
    if project_against not in PROJECTIONS:
        raise InputError(f"project_against must be one of {PROJECTIONS}, "
                         f"got {project_against!r}")
    return project_against


def state_mask(backbone: Backbone, mask: Any) -> torch.Tensor:
    """The region mask on the state grid, (1, 1, h, w) in the backbone's dtype and device.

    ``mask`` is drawn on the model's image (``backbone.image_size``), 1 = region to edit. It is
    area-averaged onto the state's spatial grid (module docstring), so latent models, whose
    states are smaller than their images, see the fraction of each latent cell in the region.
    Refused: a wrong size, values outside [0, 1], an empty region, and a region that covers the
    whole state (then the unmasked Jacobian J_U is zero and there is nothing to project against:
    use :func:`global_directions` for a whole-image direction).
    """
    ms = backbone.state_region(mask, "mask")
    if not bool((ms > 0).any()):
        raise InputError("mask is empty (all zero): mark the region to edit with 1")
    if bool((ms >= 1).all()):
        raise InputError("mask covers the whole image: RBE needs an unmasked region to keep "
                         "unchanged (use global_directions for whole-image directions)")
    return ms


# ---------------------------------------------------------------------------------- products


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
    _check_int(chunk, "chunk", 1)
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


# ---------------------------------------------------------------------------------- directions


@dataclass
class Directions:
    """h-space directions of one region at one timestep (what :func:`directions_at` found).

    ``vectors`` (k, *h_shape): the directions to edit with, unit norm, after the Eq. 14
    projection (equal to ``raw_vectors`` for ``project_against="none"`` and for global
    directions). ``raw_vectors``: the leading right singular vectors of J_M (orthonormal, sign
    convention applied). ``singular_values`` (k,), float64: those of J_M (of J for global
    directions). ``unmasked_vectors`` / ``unmasked_values``: the top k_u right singular pairs of
    J_U (None for global directions). ``mask``: the region on the state grid (h, w), None for
    global directions. ``settings``: everything needed to reproduce the run, plus its cost,
    convergence (``settings["masked_run"]`` / ``["unmasked_run"]``, summarised by
    :attr:`converged` and :attr:`error_bound`), and the decoder response of raw and projected
    vectors inside / outside the region (``settings["response"]``).
    """

    vectors: torch.Tensor
    raw_vectors: torch.Tensor
    singular_values: torch.Tensor
    timestep: int
    num_steps: int | None
    unmasked_vectors: torch.Tensor | None = None
    unmasked_values: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def h_shape(self) -> tuple[int, ...]:
        return tuple(self.vectors.shape[1:])

    def _runs(self) -> list[dict[str, Any]]:
        runs = (self.settings.get("masked_run"), self.settings.get("unmasked_run"))
        return [r for r in runs if isinstance(r, dict)]

    @property
    def converged(self) -> bool:
        """Every power iteration behind these directions passed its residual test
        (:class:`diffgeo.tangent.PowerIterationConfig` says what that guarantees)."""
        runs = self._runs()
        return bool(runs) and all(bool(r.get("converged")) for r in runs)

    @property
    def error_bound(self) -> float | None:
        """The largest angle bound (radians) of those runs: of the raw vectors' span, and of
        the unmasked span they were projected against; None when a run has none."""
        bounds = [r.get("error_bound") for r in self._runs()]
        if not bounds or any(b is None for b in bounds):
            return None
        return float(max(bounds))

    def save(self, folder: str | Path, force: bool = False) -> Path:
        """Write ``directions.safetensors`` (tensors) and ``directions.json`` (the rest).

        Refuses to overwrite either file unless ``force``: directions are costly to recompute
        and silently replacing a set that edits were made with loses the link between them.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        targets = [folder / _TENSORS, folder / _META]
        existing = [p for p in targets if p.exists()]
        if existing and not force:
            raise OutputExistsError(f"{existing[0]} exists; pass force=True (CLI: --force) to "
                                    "overwrite it")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors, "raw_vectors": self.raw_vectors,
                   "singular_values": self.singular_values}
        for name in ("unmasked_vectors", "unmasked_values", "mask"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(targets[0]))
        from diffgeo.io import to_jsonable

        meta = {"format": _FORMAT, "timestep": self.timestep, "num_steps": self.num_steps,
                "k": self.k, "h_shape": list(self.h_shape),
                "settings": to_jsonable(self.settings)}
        targets[1].write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Directions:
        """Read a folder written by :meth:`save` (tensors on the CPU, in their saved dtype)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        tpath, mpath = folder / _TENSORS, folder / _META
        if not tpath.is_file() or not mpath.is_file():
            raise InputError(f"{folder} is not a directions folder: expected {_TENSORS} and "
                             f"{_META} (written by Directions.save)")
        meta = json.loads(mpath.read_text())
        if meta.get("format") != _FORMAT:
            raise InputError(f"{mpath} has format {meta.get('format')!r}, expected {_FORMAT!r}")
        t = load_file(str(tpath))
        return cls(vectors=t["vectors"], raw_vectors=t["raw_vectors"],
                   singular_values=t["singular_values"], timestep=int(meta["timestep"]),
                   num_steps=meta["num_steps"], unmasked_vectors=t.get("unmasked_vectors"),
                   unmasked_values=t.get("unmasked_values"), mask=t.get("mask"),
                   settings=meta.get("settings", {}))


def _run_summary(r: PowerIterationResult) -> dict[str, Any]:
    return dict(iterations=r.iterations, converged=r.converged, exact=r.exact,
                error_bound=r.error_bound, block_size=r.block_size, jvps=r.jvps, vjps=r.vjps,
                last_residual=r.residuals[-1] if r.residuals else None, seed=r.seed)


def masked_response(backbone: Backbone, xt: torch.Tensor, t: int, vectors: torch.Tensor,
                    mask_state: torch.Tensor, cond: Conditioning | None = None,
                    chunk: int = 16) -> dict[str, torch.Tensor]:
    """‖M ⊙ Jε v‖ and ‖(1 - M) ⊙ Jε v‖ for each v in ``vectors`` (k, *h_shape), float64.

    Jε = ∂ε/∂h at (X_t, t), decoder only. The ratio outside / inside is the first-order leakage
    of an edit along v out of the region, at the discovery timestep.
    """
    xt = _check_x0(backbone, xt, "xt")
    with torch.no_grad():
        enc = backbone.encode(xt, t, cond)
    apply_j, _ = decoder_products(backbone, enc, None, chunk)
    jv = apply_j(vectors.to(enc.h).contiguous()).to(torch.float64)
    m = mask_state.to(jv)
    inside = (m * jv).flatten(1).norm(dim=1)
    outside = ((1 - m) * jv).flatten(1).norm(dim=1)
    return {"inside": inside, "outside": outside}


def _discover(backbone: Backbone, xt: torch.Tensor, t: int, mask_state: torch.Tensor | None,
              *, config: PowerIterationConfig, k_unmasked: int, project_against: str,
              cond: Conditioning | None, generator: torch.Generator | None, chunk: int,
              num_steps: int | None, extra_settings: dict[str, Any]) -> Directions:
    gen = default_generator(generator)
    k = config.k
    with torch.no_grad():
        enc = backbone.encode(xt, t, cond)
    h_shape = tuple(enc.h.shape[1:])
    n_h = math.prod(h_shape)
    # Checked before any product (block_power_iteration would only find k_unmasked too large
    # after the masked run); a block larger than h is clamped there, and is then exact.
    if k > n_h or (mask_state is not None and k_unmasked > n_h):
        raise InputError(f"k and k_unmasked must be <= the h dimension {n_h}, got k={k}, "
                         f"k_unmasked={k_unmasked}")
    kw = dict(generator=gen, dtype=enc.h.dtype, device=enc.h.device, space="h")
    weight_m = None if mask_state is None else mask_state
    jm, jmt = decoder_products(backbone, enc, weight_m, chunk)
    run_m = block_power_iteration(jm, jmt, h_shape, config, **kw)  # type: ignore[arg-type]
    raw = run_m.vectors
    settings: dict[str, Any] = dict(
        **config.to_dict(), timestep=int(t), num_steps=num_steps, chunk=chunk,
        seed=gen.initial_seed(), dtype=str(enc.h.dtype).replace("torch.", ""),
        backbone=dict(kind=backbone.kind, name=backbone.name), h_shape=list(h_shape),
        masked_run=_run_summary(run_m), derivative="decoder only (cached encoder skips)",
    )
    settings.update(extra_settings)
    if mask_state is None:
        settings.update(project_against="none", kind="global", mask_rule=None)
        return Directions(vectors=raw.clone(), raw_vectors=raw, singular_values=run_m.
                          singular_values, timestep=int(t), num_steps=num_steps,
                          settings=settings)

    ju, jut = decoder_products(backbone, enc, 1 - mask_state, chunk)
    run_u = block_power_iteration(ju, jut, h_shape, replace(config, k=k_unmasked),
                                  **kw)  # type: ignore[arg-type]
    if project_against == "leading":
        vectors, norms = project_out(raw, run_u.vectors[:1])
    elif project_against == "subspace":
        vectors, norms = project_out(raw, run_u.vectors)
    else:
        vectors, norms = raw.clone(), torch.ones(k, dtype=torch.float64)
    resp_raw = masked_response(backbone, xt, t, raw, mask_state, cond, chunk)
    resp = masked_response(backbone, xt, t, vectors, mask_state, cond, chunk)
    settings.update(
        kind="region", project_against=project_against, k_unmasked=k_unmasked,
        mask_rule=MASK_RULE, unmasked_run=_run_summary(run_u),
        projection_norms=norms.tolist(),
        response={"raw": {key: v.tolist() for key, v in resp_raw.items()},
                  "projected": {key: v.tolist() for key, v in resp.items()}},
    )
    return Directions(vectors=vectors, raw_vectors=raw, singular_values=run_m.singular_values,
                      timestep=int(t), num_steps=num_steps, unmasked_vectors=run_u.vectors,
                      unmasked_values=run_u.singular_values, mask=mask_state[0, 0].clone(),
                      settings=settings)


def _check_discovery_args(k: Any, k_unmasked: Any, max_iter: Any, tol: Any, oversample: Any,
                          power_passes: Any, chunk: Any, config: Any
                          ) -> tuple[PowerIterationConfig, int]:
    """The run's PowerIterationConfig (``config``, default DEFAULT_POWER, with the given
    keywords replacing its fields; validated there) and k_unmasked (default: the config's k)."""
    cfg = power_config(DEFAULT_POWER if config is None else config, k=k, max_iter=max_iter,
                       tol=tol, oversample=oversample, power_passes=power_passes)
    k_u = cfg.k if k_unmasked is None else _check_int(k_unmasked, "k_unmasked", 1)
    _check_int(chunk, "chunk", 1)
    return cfg, k_u


def directions_at(backbone: Backbone, xt: torch.Tensor, t: int, mask: Any | None, *,
                  k: int | None = None, k_unmasked: int | None = None,
                  project_against: str = "leading", cond: Conditioning | None = None,
                  max_iter: int | None = None, tol: float | None = None,
                  oversample: int | None = None, power_passes: int | None = None,
                  generator: torch.Generator | None = None, chunk: int = 16,
                  num_steps: int | None = None,
                  config: PowerIterationConfig | None = None) -> Directions:
    """RBE directions at a given state X_t (steps 3-5 of the module docstring).

    ``mask``: the region at image resolution (see :func:`state_mask`), or None for global
    directions (the whole ε, no projection). ``k_unmasked`` (default k): how many unmasked
    vectors to compute — ``"leading"`` uses only the first, but iterating a block of k_u
    converges faster than a single vector. Power-iteration options: ``config`` (a
    :class:`diffgeo.tangent.PowerIterationConfig`, default ``DEFAULT_POWER``), whose fields
    ``k``, ``max_iter``, ``tol``, ``oversample``, ``power_passes`` the keywords of the same name
    replace when given; what convergence and the error bound guarantee is stated there, and
    each run's outcome is in ``settings["masked_run"]`` / ``["unmasked_run"]``. The masked run
    draws its random start first, the unmasked run second, from one ``generator`` (default
    seeded 0). ``num_steps`` is only recorded (the grid X_t came from), for
    :func:`apply_direction`'s default.
    """
    _require_h(backbone)
    xt = _check_x0(backbone, xt, "xt")
    cfg, k_u = _check_discovery_args(k, k_unmasked, max_iter, tol, oversample, power_passes,
                                     chunk, config)
    _check_projection(project_against)
    backbone.timesteps(t, 1)
    ms = None if mask is None else state_mask(backbone, mask)
    return _discover(backbone, xt, int(t), ms, config=cfg, k_unmasked=k_u,
                     project_against=project_against, cond=cond, generator=generator,
                     chunk=chunk, num_steps=num_steps, extra_settings={})


def _discovery_grid(backbone: Backbone, grid: Grid | int, t: int | None) -> tuple[Grid, int]:
    """The grid up to the discovery timestep: ``t`` checked on it, or (None) the grid point
    nearest the paper's :data:`DEFAULT_T` (501 on a Stable Diffusion config)."""
    g = Grid.resolve(backbone, grid)
    t = g.nearest(DEFAULT_T) if t is None else g.check(t)
    return g.up_to(t), t


def discover_directions(backbone: Backbone, x0: torch.Tensor, mask: Any, *,
                        t: int | None = None,
                        grid: Grid | int = DEFAULT_STEPS, k: int | None = None,
                        k_unmasked: int | None = None, project_against: str = "leading",
                        cond: Conditioning | None = None, max_iter: int | None = None,
                        tol: float | None = None, oversample: int | None = None,
                        power_passes: int | None = None,
                        generator: torch.Generator | None = None, chunk: int = 16,
                        progress: bool = False,
                        config: PowerIterationConfig | None = None) -> Directions:
    """RBE region directions of an image: DDIM-invert ``x0`` to ``t``, then :func:`directions_at`.

    ``x0`` is the image's clean *state* (``backbone.to_state(image)``; the image itself for pixel
    models), batch 1. ``t`` must be on ``grid`` (a Grid, or a number of steps on the model's own
    grid; the error names the nearest grid timesteps). Defaults are the paper's: t = 500 (the
    grid point nearest it), 40 steps, k = 3, at most 50 passes. Power-iteration options as in
    :func:`directions_at`.
    """
    _require_h(backbone)
    x0 = _check_x0(backbone, x0, "x0")
    cfg, k_u = _check_discovery_args(k, k_unmasked, max_iter, tol, oversample, power_passes,
                                     chunk, config)
    _check_projection(project_against)
    g, t = _discovery_grid(backbone, grid, t)  # t on the grid, before any work
    ms = state_mask(backbone, mask)
    inv = invert(backbone, x0, t, g, cond, progress=progress)
    return _discover(backbone, inv.last, t, ms, config=cfg, k_unmasked=k_u,
                     project_against=project_against, cond=cond, generator=generator,
                     chunk=chunk, num_steps=g.num_steps,
                     extra_settings=dict(grid=g.to_dict(), inversion="ddim"))


def global_directions(backbone: Backbone, x0: torch.Tensor, *, t: int | None = None,
                      grid: Grid | int = DEFAULT_STEPS, k: int | None = None,
                      cond: Conditioning | None = None, max_iter: int | None = None,
                      tol: float | None = None, oversample: int | None = None,
                      power_passes: int | None = None,
                      generator: torch.Generator | None = None, chunk: int = 16,
                      progress: bool = False,
                      config: PowerIterationConfig | None = None) -> Directions:
    """Whole-image directions: the leading right singular vectors of ∂ε/∂h (no mask, no
    projection) — the unsupervised global baseline (Semdiff-like) RBE is compared with. ``t``
    and ``grid`` as in :func:`discover_directions`.
    Power-iteration options as in :func:`directions_at`."""
    _require_h(backbone)
    x0 = _check_x0(backbone, x0, "x0")
    cfg, _ = _check_discovery_args(k, None, max_iter, tol, oversample, power_passes, chunk,
                                   config)
    g, t = _discovery_grid(backbone, grid, t)
    inv = invert(backbone, x0, t, g, cond, progress=progress)
    return _discover(backbone, inv.last, t, None, config=cfg, k_unmasked=cfg.k,
                     project_against="none", cond=cond, generator=generator, chunk=chunk,
                     num_steps=g.num_steps,
                     extra_settings=dict(grid=g.to_dict(), inversion="ddim"))


# ---------------------------------------------------------------------------------- editing


def asymmetric_step(backbone: Backbone, x: torch.Tensor, t: int, t_prev: int | None,
                    eps_edit: torch.Tensor, eps_orig: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step t -> t_prev of Asyrp's asymmetric reverse process.

    Returns (x_prev, P_t, D_t) with P_t = (x - sqrt(1 - ab_t)·ε_edit) / sqrt(ab_t) (the x̂0
    prediction, from the edited h) and D_t = sqrt(1 - ab_prev)·ε_orig (the direction term, from
    the original h), so x_prev = sqrt(ab_prev)·P_t + D_t (the paper's Eq. 1-3 with eta = 0).
    ``t_prev=None`` is the clean level of the model's grid. x_prev is the sampler's own step
    (``sampling.ddim_step`` with ``eps_x0``), so ε_edit == ε_orig reproduces the plain DDIM
    step bit for bit. Pass ε_edit for both to get the symmetric ("replace") step.
    """
    ab_t, ab_prev = alpha_bar(backbone, t), alpha_bar(backbone, t_prev)
    x_prev = ddim_step(x, eps_orig, ab_t, ab_prev, eps_x0=eps_edit)
    return x_prev, predict_x0(x, eps_edit, ab_t), (1 - ab_prev) ** 0.5 * eps_orig


@dataclass
class EditResult:
    """Edits of one image along one direction, one per strength.

    ``images`` (S, C, H, W) in [-1, 1] (clamped; ``states`` keeps the unclamped final states),
    in the order of ``strengths``; ``reconstruction`` (1, C, H, W): the same generation with
    α = 0 (plain DDIM from the inverted state), the reference edits are compared with;
    ``xt``: the inverted state the generation starts from; ``edited_timesteps``: the grid
    steps that were edited.
    """

    images: torch.Tensor
    states: torch.Tensor
    strengths: list[float]
    reconstruction: torch.Tensor
    xt: torch.Tensor
    index: int
    timestep: int
    window: tuple[int, int]
    mode: str
    edited_timesteps: list[int]
    settings: dict[str, Any] = field(default_factory=dict)

    def strip(self) -> list[torch.Tensor]:
        """The reconstruction then each edit, as (1, C, H, W) images (for ``save_strip``)."""
        return [self.reconstruction, *[im[None] for im in self.images]]

    def locality(self, mask: Any) -> list[Locality]:
        """:func:`edit_locality` of every edit against the reconstruction."""
        return [edit_locality(self.reconstruction, im[None], mask) for im in self.images]


def _check_strengths(strengths: Any) -> list[float]:
    if isinstance(strengths, int | float) and not isinstance(strengths, bool):
        strengths = [strengths]
    try:
        values = [float(s) for s in strengths]
    except (TypeError, ValueError):
        raise InputError(f"strengths must be a sequence of numbers, got {strengths!r}") from None
    if not values:
        raise InputError("strengths is empty: give at least one edit strength (e.g. -30, 30)")
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"strengths must be finite, got {values}")
    return values


def apply_direction(backbone: Backbone, x0: torch.Tensor, directions: Directions, index: int,
                    strengths: Sequence[float] = (-DEFAULT_STRENGTH, DEFAULT_STRENGTH), *,
                    t_edit: int | None = None, window: tuple[int, int] | None = None,
                    grid: Grid | int | None = None, mode: str = "x0", eta: float = 0.0,
                    generator: torch.Generator | None = None,
                    cond: Conditioning | None = None, rediscover: bool = False,
                    progress: bool = False) -> EditResult:
    """Edit the image ``x0`` (clean state, batch 1) along ``directions.vectors[index]``.

    Inverts x0 to ``t_edit`` (default: the discovery timestep) on ``grid`` (a Grid or a number
    of steps on the model's grid; default: the discovery's number of steps, else 40) and
    generates back once per strength α. Every
    step whose starting timestep lies in ``window`` = (t_low, t_high) (default (0, t_edit): the
    whole generation; see the module docstring) is an asymmetric step: encoder once on the
    current state, ε_orig = ε(h), ε_edit = ε(h + α·v); ``mode="x0"`` puts ε_edit in the x̂0 term
    only (the paper), ``"replace"`` in both terms (the authors' code). Other steps are plain
    DDIM; those below t_low use ``eta`` (> 0 needs ``generator``; every strength replays the
    same noise, so strengths differ only by the edit). α = 0 reproduces ``sampling.generate``
    exactly. One generation per strength plus one for the reconstruction (α = 0).

    ``rediscover=True`` re-finds the directions at every edited timestep, on the unedited
    generation path (the reconstruction's states), with the discovery's mask and settings; the
    direction used at each step is the one most aligned with the previous step's (starting from
    ``directions.vectors[index]``), sign-matched to it, so one edit follows one direction as it
    moves. Costs one discovery per edited step; ``settings["rediscover_alignment"]`` records
    |cos| between consecutive steps' directions.
    """
    _require_h(backbone)
    x0 = _check_x0(backbone, x0, "x0")
    if not isinstance(directions, Directions):
        raise InputError(f"directions must be a Directions object, got "
                         f"{type(directions).__name__}")
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise InputError(f"index must be an integer, got {index!r}")
    if not 0 <= int(index) < directions.k:
        raise InputError(f"index {index} is out of range: these directions hold "
                         f"{directions.k} vectors (0..{directions.k - 1})")
    index = int(index)
    alphas = _check_strengths(strengths)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    h_shape = tuple(backbone.h_shape())
    if directions.h_shape != h_shape:
        raise InputError(f"directions have h shape {directions.h_shape} but this backbone's h is "
                         f"{h_shape}: they were found with another model or resolution")
    t_edit = directions.timestep if t_edit is None else t_edit
    if grid is None:
        grid = directions.num_steps or DEFAULT_STEPS
    g = Grid.resolve(backbone, grid).up_to(t_edit)
    lo, hi = (0, t_edit) if window is None else window
    if (isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int)
            or not isinstance(hi, int) or not 0 <= lo <= hi <= t_edit):
        raise InputError(f"window must be two integers (t_low, t_high) with "
                         f"0 <= t_low <= t_high <= t_edit={t_edit}, got {window!r}")
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not eta >= 0:
        raise InputError(f"eta must be a number >= 0, got {eta!r}")
    stochastic = eta > 0 and any(t < lo for t in g)
    if eta > 0 and not stochastic:
        raise InputError(f"eta > 0 only applies to steps below the edit window (t < {lo}); "
                         f"there are none: narrow the window, e.g. window=(200, {t_edit})")
    if eta > 0 and generator is None:
        raise InputError("eta > 0 draws noise: pass generator=torch.Generator().manual_seed(N)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator or None, "
                         f"got {type(generator).__name__}")
    edited = [t for t in g if lo <= t <= hi]

    v = directions.vectors[index].to(device=backbone.device, dtype=backbone.dtype)[None]
    inv = invert(backbone, x0, t_edit, g, cond, progress=progress)
    xt = inv.last
    rng_state = generator.get_state() if (stochastic and generator is not None) else None

    per_step: dict[int, torch.Tensor] = {}

    def run(alpha: float) -> Trajectory:
        if rng_state is not None and generator is not None:
            generator.set_state(rng_state)

        def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            if not lo <= t <= hi:
                return backbone.eps(x, t, cond)
            # encoder once; the original and the edited h share its skips
            enc = backbone.encode(x, t, cond)
            eps_orig = backbone.to_eps(backbone.decode(enc, enc.h), enc.x, enc.timesteps)
            eps_edit = backbone.to_eps(backbone.decode(enc, enc.h + alpha * per_step.get(t, v)),
                                       enc.x, enc.timesteps)
            return eps_edit, (eps_edit if mode == "replace" else eps_orig)

        return sample(backbone, xt, g, eps_fn=eps_fn, generator=generator,
                      eta=lambda t: eta if t < lo else 0.0, progress=progress,
                      desc=f"edit {alpha:+g}")

    recon = run(0.0)
    path = {t: recon.at(t) for t in edited}
    recon_state = recon.last
    alignment: list[float] = []
    if rediscover:
        per_step.update(_track_directions(backbone, path, directions, v, cond, alignment))
    states = torch.cat([run(a).last for a in alphas])
    settings: dict[str, Any] = dict(
        index=index, strengths=alphas, t_edit=t_edit, num_steps=g.num_steps, grid=g.to_dict(),
        window=[lo, hi], mode=mode, eta=eta, edited_steps=len(edited),
        rediscover=rediscover, rediscover_alignment=alignment,
        seed=generator.initial_seed() if generator is not None else None,
        directions=dict(kind=directions.settings.get("kind"),
                        project_against=directions.settings.get("project_against"),
                        timestep=directions.timestep),
    )
    return EditResult(
        images=backbone.to_image(states).clamp(-1, 1), states=states, strengths=alphas,
        reconstruction=backbone.to_image(recon_state).clamp(-1, 1), xt=xt, index=index,
        timestep=t_edit, window=(lo, hi), mode=mode, edited_timesteps=edited,
        settings=settings,
    )


def _track_directions(backbone: Backbone, path: dict[int, torch.Tensor], directions: Directions,
                      v: torch.Tensor, cond: Conditioning | None,
                      alignment: list[float]) -> dict[int, torch.Tensor]:
    """Directions re-found at each state of ``path`` (descending t), following ``v``."""
    s = directions.settings
    mask = None
    if directions.mask is not None:  # back to image resolution (exact under area averaging)
        mask = F.interpolate(directions.mask.reshape(1, 1, *directions.mask.shape[-2:]).float(),
                             size=tuple(backbone.image_size), mode="nearest")[0, 0]
    prev = v.flatten()
    out: dict[int, torch.Tensor] = {}
    for t in sorted(path, reverse=True):
        found = directions_at(
            backbone, path[t], t, mask, k=directions.k,
            project_against=s.get("project_against", "leading") if mask is not None else "none",
            cond=cond, max_iter=int(s.get("max_iter", 50)), tol=float(s.get("tol", 1e-4)),
            oversample=int(s.get("oversample", 0) or 0), power_passes=s.get("power_passes"),
            generator=torch.Generator().manual_seed(int(s.get("seed", 0) or 0)))
        cands = found.vectors.to(device=prev.device, dtype=prev.dtype).flatten(1)
        cos = cands @ prev / (cands.norm(dim=1) * prev.norm()).clamp_min(1e-30)
        j = int(cos.abs().argmax())
        chosen = cands[j] * (1.0 if float(cos[j]) >= 0 else -1.0)
        alignment.append(float(cos[j].abs()))
        out[t] = chosen.reshape(v.shape)
        prev = chosen
    return out


# ---------------------------------------------------------------------------------- metrics
