"""Finding RBE directions: block power iteration on the masked and unmasked decoder Jacobians,
then the Eq. 14 projection (steps 3-5 of the method)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.editing.rbe.config import (
    DEFAULT_STEPS,
    DEFAULT_T,
    MASK_RULE,
    RBEConfig,
    check_state,
    require_h,
    state_mask,
)
from diffgeo.editing.rbe.directions import Directions
from diffgeo.editing.rbe.products import decoder_products, masked_response, project_out
from diffgeo.errors import InputError
from diffgeo.sampling import Grid, invert
from diffgeo.sampling.flow import time_value
from diffgeo.tangent import PowerIterationResult, block_power_iteration, default_generator


def _config(config: Any) -> RBEConfig:
    if config is None:
        return RBEConfig()
    if not isinstance(config, RBEConfig):
        raise InputError(f"config must be an RBEConfig, got {type(config).__name__}")
    return config


def _run_summary(r: PowerIterationResult) -> dict[str, Any]:
    return dict(iterations=r.iterations, converged=r.converged, exact=r.exact,
                error_bound=r.error_bound, block_size=r.block_size, jvps=r.jvps, vjps=r.vjps,
                last_residual=r.residuals[-1] if r.residuals else None, seed=r.seed)


def _discover(backbone: Backbone, xt: torch.Tensor, t: int, mask_state: torch.Tensor | None,
              config: RBEConfig, cond: Conditioning | None, generator: torch.Generator | None,
              num_steps: int | None, extra_settings: dict[str, Any]) -> Directions:
    gen = default_generator(generator)
    k, k_unmasked, chunk = config.k, config.unmasked_k, config.chunk
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
    jm, jmt = decoder_products(backbone, enc, mask_state, chunk)
    run_m = block_power_iteration(jm, jmt, h_shape, config.power, **kw)  # type: ignore[arg-type]
    raw = run_m.vectors
    settings: dict[str, Any] = dict(
        **replace(config, t=time_value(t)).to_dict(), timestep=time_value(t),
        num_steps=num_steps,
        seed=gen.initial_seed(), dtype=str(enc.h.dtype).replace("torch.", ""),
        # a flow model's h block: another block's h has the same shape but another meaning
        backbone=dict(kind=backbone.kind, name=backbone.name,
                      h_block=getattr(backbone, "h_block", None)), h_shape=list(h_shape),
        masked_run=_run_summary(run_m), derivative="decoder only (cached encoder skips)",
    )
    settings.update(extra_settings)
    if mask_state is None:
        settings.update(project_against="none", k_unmasked=None, kind="global", mask_rule=None)
        return Directions(vectors=raw.clone(), raw_vectors=raw, singular_values=run_m.
                          singular_values, timestep=time_value(t), num_steps=num_steps,
                          settings=settings)

    ju, jut = decoder_products(backbone, enc, 1 - mask_state, chunk)
    run_u = block_power_iteration(ju, jut, h_shape, replace(config.power, k=k_unmasked),
                                  **kw)  # type: ignore[arg-type]
    if config.project_against == "leading":
        vectors, norms = project_out(raw, run_u.vectors[:1])
    elif config.project_against == "subspace":
        vectors, norms = project_out(raw, run_u.vectors)
    else:
        vectors, norms = raw.clone(), torch.ones(k, dtype=torch.float64)
    resp_raw = masked_response(backbone, xt, t, raw, mask_state, cond, chunk)
    resp = masked_response(backbone, xt, t, vectors, mask_state, cond, chunk)
    settings.update(
        kind="region", k_unmasked=k_unmasked, mask_rule=MASK_RULE,
        unmasked_run=_run_summary(run_u), projection_norms=norms.tolist(),
        response={"raw": {key: v.tolist() for key, v in resp_raw.items()},
                  "projected": {key: v.tolist() for key, v in resp.items()}},
    )
    return Directions(vectors=vectors, raw_vectors=raw, singular_values=run_m.singular_values,
                      timestep=time_value(t), num_steps=num_steps,
                      unmasked_vectors=run_u.vectors,
                      unmasked_values=run_u.singular_values, mask=mask_state[0, 0].clone(),
                      settings=settings)


def directions_at(backbone: Backbone, xt: torch.Tensor, t: int, mask: Any | None,
                  config: RBEConfig | None = None, *, cond: Conditioning | None = None,
                  generator: torch.Generator | None = None,
                  num_steps: int | None = None) -> Directions:
    """RBE directions at a given state X_t of level ``t`` (steps 3-5 of the method).

    ``mask``: the region at image resolution (see :func:`state_mask`), or None for global
    directions (the whole ε, no projection). ``config``: an :class:`RBEConfig` (default: the
    paper's); its ``t`` must be None or ``t``. What convergence and the error bound guarantee
    is stated in :class:`diffgeo.tangent.PowerIterationConfig`; each run's outcome is in
    ``settings["masked_run"]`` / ``["unmasked_run"]``. The masked run draws its random start
    first, the unmasked run second, from one ``generator`` (default seeded 0). ``num_steps`` is
    only recorded (the grid X_t came from), for :func:`apply_direction`'s default.
    """
    require_h(backbone)
    xt = check_state(backbone, xt, "xt")
    cfg = _config(config)
    backbone.timesteps(t, 1)
    if cfg.t is not None and cfg.t != t:
        raise InputError(f"config.t={cfg.t} but the state is at t={t}: leave config.t None "
                         "(or equal to t) when the state is given")
    ms = None if mask is None else state_mask(backbone, mask)
    if ms is None:
        cfg = replace(cfg, project_against="none", k_unmasked=None)
    return _discover(backbone, xt, time_value(t), ms, cfg, cond, generator, num_steps, {})


def _inverted(backbone: Backbone, x0: torch.Tensor, cfg: RBEConfig, grid: Grid | int,
              cond: Conditioning | None, progress: bool) -> tuple[torch.Tensor, int, Grid]:
    """X_t of the image's DDIM inversion to the config's t (None: the grid point nearest the
    paper's 500), the t, and the grid up to it; t is checked before any work."""
    g = Grid.resolve(backbone, grid)
    t = g.nearest(DEFAULT_T) if cfg.t is None else g.check(cfg.t)
    g = g.up_to(t)
    return invert(backbone, x0, t, g, cond, progress=progress).last, t, g


def discover_directions(backbone: Backbone, x0: torch.Tensor, mask: Any,
                        config: RBEConfig | None = None, *,
                        grid: Grid | int = DEFAULT_STEPS, cond: Conditioning | None = None,
                        generator: torch.Generator | None = None,
                        progress: bool = False) -> Directions:
    """RBE region directions of an image: DDIM-invert ``x0`` to ``config.t``, then
    :func:`directions_at`.

    ``x0`` is the image's clean *state* (``backbone.to_state(image)``; the image itself for pixel
    models), batch 1. ``config.t`` must be on ``grid`` (a Grid, or a number of steps on the
    model's own grid; the error names the nearest grid timesteps). Defaults are the paper's:
    t = 500 (the grid point nearest it), 40 steps, k = 3, at most 50 passes.
    """
    require_h(backbone)
    x0 = check_state(backbone, x0, "x0")
    cfg = _config(config)
    ms = state_mask(backbone, mask)
    xt, t, g = _inverted(backbone, x0, cfg, grid, cond, progress)
    return _discover(backbone, xt, t, ms, cfg, cond, generator, g.num_steps,
                     dict(grid=g.to_dict(), inversion="ddim"))


def global_directions(backbone: Backbone, x0: torch.Tensor, config: RBEConfig | None = None,
                      *, grid: Grid | int = DEFAULT_STEPS, cond: Conditioning | None = None,
                      generator: torch.Generator | None = None,
                      progress: bool = False) -> Directions:
    """Whole-image directions: the leading right singular vectors of ∂ε/∂h (no mask, no
    projection: the config's ``project_against`` and ``k_unmasked`` do not apply) — the
    unsupervised global baseline (Semdiff-like) RBE is compared with. ``config`` and ``grid``
    as in :func:`discover_directions`."""
    require_h(backbone)
    x0 = check_state(backbone, x0, "x0")
    cfg = replace(_config(config), project_against="none", k_unmasked=None)
    xt, t, g = _inverted(backbone, x0, cfg, grid, cond, progress)
    return _discover(backbone, xt, t, None, cfg, cond, generator, g.num_steps,
                     dict(grid=g.to_dict(), inversion="ddim"))
