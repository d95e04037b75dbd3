"""Generation curves (generation-curves paper §3): how fast an image component is generated.

A *generation curve* c(𝒳, v) is the sequence of generation rates r_t(X_t, v) along a DDIM path
𝒳 = ⟨X_t⟩ for a fixed direction v in state space (a pixel, a patch, a row...). This module
implements the differentiable definition used for editing, r_t = ‖D h_t(X_t)[v]‖ with h the U-Net
bottleneck (§4.1), with K directions per timestep in one batched JVP; the tangent-projected
definitions (Eq. 6, Fig. 5) build on ``diffgeo.tangent``.

Pixel → state rule: for pixel models a pixel (r, c) is the state cell (r, c). For latent models
the image pixel (r, c) falls in latent cell (r // f, c // f), f = image size / state size (the VAE's
downsampling factor); the direction is that cell, over all latent channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.errors import InputError
from diffgeo.jacobian import batched_jvp
from diffgeo.sampling import Grid, Trajectory, invert, step_coefficients_at, step_output
from diffgeo.tangent import TangentBasis, tangent_basis

DEFINITIONS = ("exact", "eps", "h-proj", "h")
PROJECTED = ("exact", "eps", "h-proj")


@dataclass
class GenerationCurves:
    """Rates of K components over the timesteps of one path: ``values`` has shape (K, N), on
    the CPU, in :func:`result_dtype` of the backbone (float64 from a float64 backbone)."""

    timesteps: list[int]
    values: torch.Tensor
    definition: str
    labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def fluctuation(self, window: int = 5, t_min: int = 200) -> torch.Tensor:
        return fluctuation(self.values, self.timesteps, window, t_min)


@dataclass(frozen=True)
class Component:
    """An image component: the uniform average (Eq. 7) over the rates of its pixels."""

    label: str
    pixels: tuple[tuple[int, int], ...]
    channel: int | None = None


def result_dtype(backbone: Backbone) -> torch.dtype:
    """The dtype rates are returned in: the backbone's, but at least float32.

    Rates keep the precision they were computed in, so a float64 backbone gives float64
    curves and maps (what closed-form checks need); a half-precision forward pass is widened
    because the fluctuation statistic subtracts nearby rates.
    """
    return torch.promote_types(backbone.dtype, torch.float32)


def pixel_component(backbone: Backbone, pixel: Sequence[int],
                    channel: int | None = None) -> Component:
    state_cell(backbone, pixel)
    r, c = int(pixel[0]), int(pixel[1])
    return Component(f"pixel ({r},{c})" + ("" if channel is None else f" ch{channel}"),
                     ((r, c),), channel)


def mask_component(backbone: Backbone, mask: torch.Tensor | np.ndarray, label: str = "region",
                   channel: int | None = None) -> Component:
    """All state cells covered by a (1,1,H,W) / (H,W) image mask (> 0.5), as image pixels."""
    m = torch.as_tensor(np.asarray(mask)).squeeze()
    if tuple(m.shape) != tuple(backbone.image_size):
        raise InputError(f"mask must be {backbone.image_size[0]}x{backbone.image_size[1]}, "
                         f"got {tuple(m.shape)}")
    cells = {state_cell(backbone, (int(r), int(c))) for r, c in torch.nonzero(m > 0.5).tolist()}
    if not cells:
        raise InputError("mask is empty: no pixel above 0.5")
    H, W = backbone.image_size
    h, w = backbone.state_shape[-2:]
    # Represent each covered cell by its first image pixel, so every cell counts once.
    pixels = tuple(sorted(((r * H + h - 1) // h, (c * W + w - 1) // w) for r, c in cells))
    return Component(label, pixels, channel)


def row_component(backbone: Backbone, row: int, channel: int | None = None) -> Component:
    return Component(f"row {row}", tuple((row, c) for c in range(backbone.image_size[1])), channel)


def column_component(backbone: Backbone, col: int, channel: int | None = None) -> Component:
    return Component(f"column {col}", tuple((r, col) for r in range(backbone.image_size[0])),
                     channel)


def component_directions(backbone: Backbone, component: Component) -> torch.Tensor:
    """Unit state directions of the component's pixels: (P, *state_shape)."""
    return torch.stack([pixel_direction(backbone, p, component.channel)
                        for p in component.pixels])


def previous_level(backbone: Backbone, trajectory: Trajectory, t: int) -> int | None:
    """The level the generation step from t lands on (None = clean) on the trajectory's grid."""
    grid = sorted(trajectory.noisy_timesteps())
    i = grid.index(t)
    return grid[i - 1] if i > 0 else None


def projected_operator(backbone: Backbone, x: torch.Tensor, t: int, t_prev: int | None,
                       basis: TangentBasis, definition: str,
                       cond: Conditioning | None = None, chunk: int = 16) -> torch.Tensor:
    """M (n_out, k) with rate(v) = ‖M · Vᵀ v‖ for a projected definition (k JVPs in all).

    exact:  M = A(t)·V + B(t)·Dε[V]  (Eq. 8, A and B of the generation step t -> t_prev;
            on flow-matching models A = 1, B = σ_prev − σ and the velocity's Dv[V])
    eps:    M = Dε[V]
    h-proj: M = Dh[V]
    """
    V = basis.vectors.to(x)[:, None]  # (k, 1, *state)
    output = _output(backbone, definition)
    JV = batched_jvp(backbone, x, V, t, cond, output=output, chunk=chunk).flatten(1)  # (k, n)
    if definition == "exact":
        a, b = step_coefficients_at(backbone, t, t_prev)
        JV = a * V.flatten(1) + b * JV
    return JV.T


def rates_at(backbone: Backbone, x: torch.Tensor, t: int, directions: torch.Tensor,
             definition: str = "h", basis: TangentBasis | None = None,
             t_prev: int | None = None, cond: Conditioning | None = None,
             chunk: int = 16, per_direction: bool = False) -> torch.Tensor:
    """Generation rates r_t(X_t, v) of P unit directions (P, *state) at one state: (P,).

    Projected definitions use the k×k operator form (k JVPs for any number of directions);
    ``per_direction=True`` instead projects every direction and takes one JVP each, the
    straightforward way the papers imply, kept as the reference.
    """
    check_definition(definition)
    if definition == "h":
        jv = batched_jvp(backbone, x, directions.to(x)[:, None], t, cond, output="h",
                         chunk=chunk)
        return jv.flatten(1).norm(dim=1)
    if basis is None:
        raise InputError(f"definition {definition!r} projects on the tangent space: pass basis")
    if per_direction:
        P = basis.project(directions.to(x))
        output = _output(backbone, definition)
        JP = batched_jvp(backbone, x, P[:, None], t, cond, output=output, chunk=chunk).flatten(1)
        if definition == "exact":
            a, b = step_coefficients_at(backbone, t, t_prev)
            JP = a * P.flatten(1) + b * JP
        return JP.norm(dim=1)
    M = projected_operator(backbone, x, t, t_prev, basis, definition, cond, chunk)
    coords = basis.coordinates(directions.to(x))  # (P, k)
    return (coords @ M.T).norm(dim=1)


def _output(backbone: Backbone, definition: str) -> str:
    """What a projected definition differentiates: h, ε, or what the step consumes."""
    if definition == "h-proj":
        return "h"
    return step_output(backbone) if definition == "exact" else "eps"


def check_definition(definition: str) -> None:
    if definition not in DEFINITIONS:
        raise InputError(f"definition must be one of {DEFINITIONS}, got {definition!r}")


def generation_curves(backbone: Backbone, trajectory: Trajectory,
                      components: Sequence[Component] | torch.Tensor, definition: str = "h",
                      cond: Conditioning | None = None, k: int = 3, chunk: int = 16,
                      t_min: int | None = None, basis_options: dict[str, Any] | None = None,
                      labels: Sequence[str] | None = None,
                      bases: dict[int, TangentBasis] | None = None,
                      progress: bool = False) -> GenerationCurves:
    """Curves c(𝒳, v) of components (or raw unit directions (K, *state)) along a batch-1 path.

    Projected definitions need one tangent basis per timestep: pass ``bases`` (from
    ``tangent_bases_along``, to share them between definitions) or they are computed here,
    warm-started along the path and oversampled by 4 unless ``basis_options`` says otherwise.
    A component's rate is the mean of its pixels' (Eq. 7).
    """
    check_definition(definition)
    if trajectory.first.shape[0] != 1:
        raise InputError("generation_curves takes a trajectory of one image (batch 1)")
    if isinstance(components, torch.Tensor):
        dirs = components[None] if components.ndim == len(backbone.state_shape) else components
        if tuple(dirs.shape[1:]) != tuple(backbone.state_shape):
            raise InputError(f"directions must have shape (K, {backbone.state_shape}), "
                             f"got {tuple(dirs.shape)}")
        groups = [[i] for i in range(len(dirs))]
        names = list(labels) if labels else [f"direction {i}" for i in range(len(dirs))]
    else:
        if not components:
            raise InputError("components is empty: give at least one pixel, region, row or column")
        all_dirs, groups, start = [], [], 0
        for comp in components:
            d = component_directions(backbone, comp)
            all_dirs.append(d)
            groups.append(list(range(start, start + len(d))))
            start += len(d)
        dirs = torch.cat(all_dirs)
        names = [c.label for c in components]
    dirs = dirs.to(backbone.device, backbone.dtype)
    steps = sorted(t for t in trajectory.noisy_timesteps() if t_min is None or t >= t_min)
    values = []
    basis = None
    opts = {"oversample": 4, **(basis_options or {})}
    for t in tqdm(steps, desc=f"curves ({definition})", disable=not progress, leave=False):
        x = trajectory.at(t)
        if definition in PROJECTED:
            if bases is not None and t in bases:
                basis = bases[t]
            else:
                basis = tangent_basis(backbone, x, t, cond, k=k, init=basis, chunk=chunk,
                                      **opts)
        r = rates_at(backbone, x, t, dirs, definition, basis,
                     previous_level(backbone, trajectory, t), cond, chunk)
        values.append(torch.stack([r[g].mean() for g in groups]))
    vals = torch.stack(values, dim=1).detach().to("cpu", result_dtype(backbone))
    return GenerationCurves(steps, vals, definition, names,
                            {"k": k, "chunk": chunk, "t_min": t_min, "basis_options": opts})


def state_cell(backbone: Backbone, pixel: Sequence[int]) -> tuple[int, int]:
    """The state cell an image pixel (row, col) falls in (see the module docstring)."""
    H, W = backbone.image_size
    r, c = int(pixel[0]), int(pixel[1])
    if not (0 <= r < H and 0 <= c < W):
        raise InputError(f"pixel ({r}, {c}) is outside the {H}x{W} image")
    h, w = backbone.state_shape[-2:]
    return r * h // H, c * w // W


def pixel_direction(backbone: Backbone, pixel: Sequence[int],
                    channel: int | None = None) -> torch.Tensor:
    """Unit vector e_ij in state space: one cell, all channels (or one), shape state_shape."""
    r, c = state_cell(backbone, pixel)
    C = backbone.state_shape[0]
    v = torch.zeros(backbone.state_shape, dtype=backbone.dtype, device=backbone.device)
    if channel is None:
        v[:, r, c] = 1.0 / C**0.5
    else:
        if not 0 <= channel < C:
            raise InputError(f"channel must lie in 0..{C - 1}, got {channel}")
        v[channel, r, c] = 1.0
    return v


def check_window(timesteps: Sequence[int], window: int, t_min: int) -> None:
    """The fluctuation's window fits the timesteps above ``t_min`` (checkable from the grid
    alone, before a path is walked)."""
    if window < 2:
        raise InputError(f"window must be >= 2, got {window}")
    above = sum(t > t_min for t in timesteps)
    if above < window:
        raise InputError(f"only {above} timesteps lie above t_min={t_min}: fewer than the window "
                         f"({window}); lower --window or --t-min, or raise --steps")


def fluctuation(values: torch.Tensor, timesteps: Sequence[int], window: int = 5,
                t_min: int = 200) -> torch.Tensor:
    """Mean sliding-window variance of each curve over t > t_min (paper §3.2, App. C.1).

    ``values`` is (N,) or (K, N) over ascending ``timesteps``; windows lie entirely in t > t_min.
    """
    v = values if values.ndim == 2 else values[None]
    ts = torch.as_tensor(list(timesteps))
    if v.shape[1] != len(ts):
        raise InputError(f"values have {v.shape[1]} timesteps, timesteps has {len(ts)}")
    check_window(timesteps, window, t_min)
    keep = v[:, ts > t_min]
    windows = keep.unfold(1, window, 1)  # (K, n_windows, window)
    out = windows.var(dim=-1, unbiased=False).mean(dim=-1)
    return out if values.ndim == 2 else out[0]


def salient_and_background_pixels(mask: np.ndarray, rng: np.random.Generator,
                                  margin: int = 3) -> tuple[tuple[int, int], tuple[int, int]]:
    """One pixel well inside the object and one at least ``margin`` pixels away from it.

    The paper samples one pixel of maximal and one of minimal saliency; with an object mask as the
    saliency ground truth, 'maximal' is the object interior (the mask eroded once, so the pixel is
    not on an anti-aliased edge) and 'minimal' the background away from the object.
    """
    m = mask > 0.5
    if not m.any() or m.all():
        raise InputError("the mask must contain both object and background pixels")
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    obj = np.argwhere(inner if inner.any() else m)
    pts = np.argwhere(m)
    grid = np.argwhere(np.ones_like(m))
    d = np.sqrt(((grid[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).min(1).reshape(m.shape)
    far = np.argwhere(d >= margin)
    if len(far) == 0:
        far = np.argwhere(d == d.max())
    o = obj[rng.integers(len(obj))]
    b = far[rng.integers(len(far))]
    return (int(o[0]), int(o[1])), (int(b[0]), int(b[1]))


@dataclass
class SaliencyCheck:
    """Fig. 3 over a set of images with saliency masks: does the salient pixel fluctuate more?"""

    fraction: float
    salient: list[float]
    background: list[float]
    pixels: list[tuple[tuple[int, int], tuple[int, int]]]
    settings: dict[str, Any] = field(default_factory=dict)


def saliency_check(backbone: Backbone, images: torch.Tensor, masks: Sequence[np.ndarray],
                   definition: str = "h", grid: Grid | int = 50, t: int | None = None,
                   window: int = 5, t_min: int = 200, k: int = 3, seed: int = 0,
                   margin: int = 3, cond: Conditioning | None = None,
                   progress: bool = False) -> SaliencyCheck:
    """For each image (B, C, H, W) in [-1, 1] and its mask (H, W), sample one salient (object
    interior) and one non-salient pixel (``salient_and_background_pixels``, generator seeded with
    ``seed``), trace both curves along the image's DDIM inversion path, and report the fraction
    of images where the salient curve fluctuates more (the paper: 86% with SD 2.1)."""
    if len(images) != len(masks):
        raise InputError(f"{len(images)} images but {len(masks)} masks")
    if len(images) == 0:
        raise InputError("saliency_check needs at least one image")
    g = Grid.resolve(backbone, grid)
    t_top = g.top if t is None else g.check(t)
    rng = np.random.default_rng(seed)
    sal, bg, pix = [], [], []
    for i in tqdm(range(len(images)), desc="saliency check", disable=not progress):
        s_px, b_px = salient_and_background_pixels(np.asarray(masks[i]), rng, margin)
        with torch.no_grad():
            state = backbone.to_state(images[i:i + 1].to(backbone.device, backbone.dtype))
        inv = invert(backbone, state, t_top, g, cond)
        comps = [pixel_component(backbone, s_px), pixel_component(backbone, b_px)]
        f = generation_curves(backbone, inv, comps, definition, cond, k=k).fluctuation(
            window, t_min)
        sal.append(float(f[0]))
        bg.append(float(f[1]))
        pix.append((s_px, b_px))
    frac = float(np.mean([a > b for a, b in zip(sal, bg, strict=True)]))
    return SaliencyCheck(frac, sal, bg, pix, {
        "definition": definition, "num_steps": g.num_steps, "grid": g.to_dict(), "t": t_top,
        "window": window, "t_min": t_min, "k": k, "seed": seed, "margin": margin,
        "images": len(images)})
