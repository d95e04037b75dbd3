"""Whole-image generation-rate maps and saliency maps, without one JVP per pixel (DESIGN.md §4).

For a projected definition with tangent basis V (n×k) and operator M (n_out×k, k JVPs), every
cell's direction v_i has r(v_i)² = c_iᵀ G c_i with c_i = Vᵀ v_i and G = MᵀM (k×k): the whole map
costs k JVPs after the basis. For the unprojected ‖D h[v_i]‖:
- ``probe``: with Gaussian u in h-space, E[((Jᵀu)·v_i)²] = ‖J v_i‖², so K VJPs give every cell;
  the squared rate is ‖J v_i‖²·χ²_K/K (relative std sqrt(2/K)), so the rate itself has relative
  standard deviation ≈ sqrt(1/(2K)) (reported as ``relative_std``);
- ``lowrank``: Σ_j σ_j² (V_j·v_i)² from the top-k singular pairs of J: a lower bound that is exact
  when J has rank ≤ k;
- ``loop``: one JVP per cell (of the projected direction, for projected definitions), the
  straightforward way and the reference the others are tested against.
Cells are state cells (pixels for pixel models, latent cells for latent models); a cell's
direction covers all its channels (unit norm) or one channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.curves import (
    PROJECTED,
    check_definition,
    fluctuation,
    projected_operator,
    result_dtype,
)
from diffgeo.errors import InputError
from diffgeo.jacobian import batched_vjp
from diffgeo.sampling import Trajectory
from diffgeo.tangent import TangentBasis, tangent_basis

ESTIMATORS = ("gram", "probe", "lowrank", "loop")


def default_estimator(definition: str) -> str:
    """The estimator a map of ``definition`` uses unless told: exact Gram for the projected
    definitions, random probes for plain h."""
    return "gram" if definition in PROJECTED else "probe"


@dataclass
class RateMap:
    """Rates of every state cell at one timestep: ``values`` (h, w), on the CPU, in
    ``curves.result_dtype`` of the backbone (float64 from a float64 backbone)."""

    values: torch.Tensor
    timestep: int
    definition: str
    estimator: str
    relative_std: float = 0.0  # per-cell statistical error of the estimator (0: deterministic)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class RateMaps:
    """Rate maps along a path: ``values`` (N, h, w) over ascending ``timesteps``."""

    timesteps: list[int]
    values: torch.Tensor
    definition: str
    estimator: str
    relative_std: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def saliency(self, window: int = 5, t_min: int = 200) -> torch.Tensor:
        return saliency_map(self, window, t_min)


def _cell_weights(backbone: Backbone, channel: int | None) -> torch.Tensor:
    """Weights over channels of one cell's unit direction: (C,)."""
    C = backbone.state_shape[0]
    if channel is None:
        return torch.full((C,), C**-0.5, dtype=torch.float64)
    if not 0 <= channel < C:
        raise InputError(f"channel must lie in 0..{C - 1}, got {channel}")
    w = torch.zeros(C, dtype=torch.float64)
    w[channel] = 1.0
    return w


def cell_coordinates(basis: TangentBasis, weights: torch.Tensor) -> torch.Tensor:
    """c_i = Vᵀ v_i for every cell at once: (k, h, w)."""
    V = basis.vectors  # (k, C, h, w)
    return torch.einsum("kchw,c->khw", V.double(), weights.to(V.device))


def cell_directions(backbone: Backbone, channel: int | None = None) -> torch.Tensor:
    """Every cell's unit direction, (h*w, *state_shape): for the reference loop."""
    C, h, w = backbone.state_shape
    wts = _cell_weights(backbone, channel).to(backbone.dtype)
    eye = torch.eye(h * w, dtype=backbone.dtype).reshape(h * w, 1, h, w)
    return (eye * wts.reshape(1, C, 1, 1)).to(backbone.device)


def rate_map(backbone: Backbone, x: torch.Tensor, t: int, definition: str = "h",
             estimator: str | None = None, basis: TangentBasis | None = None,
             t_prev: int | None = None, cond: Conditioning | None = None,
             channel: int | None = None, probes: int = 64,
             generator: torch.Generator | None = None, k: int = 3, chunk: int = 16,
             basis_options: dict[str, Any] | None = None) -> RateMap:
    """The rate of every cell at state x (batch 1), timestep t.

    ``estimator`` defaults to ``gram`` for projected definitions and ``probe`` for ``h``.
    ``t_prev`` is the level the generation step from t lands on (exact definition only).
    """
    check_definition(definition)
    if x.shape[0] != 1:
        raise InputError("rate_map takes one state (batch 1)")
    estimator = estimator or default_estimator(definition)
    if estimator not in ESTIMATORS:
        raise InputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    C, h, w = backbone.state_shape
    wts = _cell_weights(backbone, channel)
    rel = 0.0
    if estimator == "loop":
        from diffgeo.curves import rates_at

        if definition in PROJECTED and basis is None:
            basis = tangent_basis(backbone, x, t, cond, k=k, chunk=chunk,
                                  **(basis_options or {}))
        dirs = cell_directions(backbone, channel)
        vals = torch.cat([rates_at(backbone, x, t, dirs[s:s + 256], definition, basis, t_prev,
                                   cond, chunk, per_direction=True)
                          for s in range(0, len(dirs), 256)])
        values = vals.reshape(h, w)
    elif estimator == "gram":
        if definition not in PROJECTED:
            raise InputError("estimator 'gram' needs a projected definition (exact, eps, h-proj);"
                             " use 'probe', 'lowrank' or 'loop' for 'h'")
        if basis is None:
            basis = tangent_basis(backbone, x, t, cond, k=k, chunk=chunk,
                                  **(basis_options or {}))
        M = projected_operator(backbone, x, t, t_prev, basis, definition, cond, chunk).double()
        G = M.T @ M
        c = cell_coordinates(basis, wts)
        values = torch.einsum("khw,kl,lhw->hw", c, G, c).clamp_min(0).sqrt()
    else:
        if definition != "h":
            raise InputError(f"estimator {estimator!r} is for the unprojected 'h' definition; "
                             "use 'gram' or 'loop' for projected ones")
        if estimator == "probe":
            if probes < 1:
                raise InputError(f"probes must be >= 1, got {probes}")
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            h_shape = (1, *backbone.h_shape())
            U = torch.randn(probes, *h_shape, generator=gen, dtype=x.dtype,
                            device=gen.device).to(x.device)
            G = batched_vjp(backbone, x, U, t, cond, output="h", chunk=chunk)[:, 0]
            s = torch.einsum("kchw,c->khw", G.double(), wts.to(G.device))
            values = s.pow(2).mean(0).sqrt()
            rel = (1.0 / (2.0 * probes)) ** 0.5
        else:  # lowrank
            if basis is None:
                basis = tangent_basis(backbone, x, t, cond, k=k, output="h", chunk=chunk,
                                      **(basis_options or {}))
            c = cell_coordinates(basis, wts)
            sig = basis.singular_values.double().to(c.device)
            values = torch.einsum("khw,k->hw", c.pow(2), sig.pow(2)).sqrt()
    return RateMap(values.detach().to("cpu", result_dtype(backbone)), t, definition, estimator, rel,
                   {"channel": channel, "probes": probes if estimator == "probe" else None,
                    "k": k if definition in PROJECTED or estimator == "lowrank" else None})


def rate_maps_along(backbone: Backbone, trajectory: Trajectory, definition: str = "h",
                    estimator: str | None = None, cond: Conditioning | None = None,
                    channel: int | None = None, probes: int = 64, seed: int = 0, k: int = 3,
                    chunk: int = 16, t_min: int | None = None,
                    basis_options: dict[str, Any] | None = None,
                    progress: bool = False) -> RateMaps:
    """Rate maps at every grid timestep of a batch-1 path: [T × h × w].

    Tangent bases are warm-started from the previous timestep (the tangent space moves slowly,
    oversampled by 4 unless ``basis_options`` says otherwise). Every timestep uses the *same*
    probes (a generator re-seeded with ``seed``): the estimator's error is then correlated along
    the path instead of adding independent noise to each point, which the fluctuation statistic
    would otherwise count as saliency.
    """
    if trajectory.first.shape[0] != 1:
        raise InputError("rate_maps_along takes a trajectory of one image (batch 1)")
    from diffgeo.curves import previous_level

    steps = sorted(t for t in trajectory.noisy_timesteps() if t_min is None or t >= t_min)
    opts = {"oversample": 4, **(basis_options or {})}
    basis = None
    maps = []
    est = None
    for t in tqdm(steps, desc=f"rate maps ({definition})", disable=not progress, leave=False):
        x = trajectory.at(t)
        uses_basis = definition in PROJECTED or estimator == "lowrank"
        if uses_basis:
            # The tangent space is that of the bottleneck map h_t (paper §2.2) for every
            # definition; warm-started from the previous timestep's basis.
            basis = tangent_basis(backbone, x, t, cond, k=k, init=basis, chunk=chunk, **opts)
        m = rate_map(backbone, x, t, definition, estimator, basis,
                     previous_level(backbone, trajectory, t), cond, channel, probes,
                     torch.Generator().manual_seed(seed), k, chunk)
        est = m
        maps.append(m.values)
    assert est is not None
    return RateMaps(steps, torch.stack(maps), definition, est.estimator, est.relative_std,
                    dict(est.settings, seed=seed, t_min=t_min, basis_options=opts))


def saliency_map(maps: RateMaps, window: int = 5, t_min: int = 200) -> torch.Tensor:
    """Per-cell fluctuation of the rate curves (mean windowed variance over t > t_min): (h, w)."""
    N, h, w = maps.values.shape
    f = fluctuation(maps.values.reshape(N, h * w).T, maps.timesteps, window, t_min)
    return f.reshape(h, w)


def upsample_to_image(values: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """A cell map shown at image resolution (nearest: each cell covers its pixels exactly),
    in the map's own floating dtype."""
    v = values[None, None]
    v = v if v.is_floating_point() else v.float()
    return torch.nn.functional.interpolate(v, size=tuple(image_size), mode="nearest")[0, 0]
