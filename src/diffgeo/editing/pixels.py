"""PIXELS: progressive exemplar editing (Algorithms 1 and 2 of the PIXELS paper), any backbone.

The method, as implemented here (every choice below is a documented convention):

* **Order.** The *source* comes first, then the exemplars in the order given. Noise is drawn in
  that order from the caller's explicit ``generator``: one draw z_k of the state's shape per image
  (source, exemplar 1, exemplar 2, ...), reused at every executed timestep through the forward
  process x_t = sqrt(ab_t)·x0 + sqrt(1 - ab_t)·z_k. No other RNG is consumed.
* **Steps.** The grid is the model's own (``sampling.Grid``: its scheduler's spacing, offset
  and clean-end alpha_bar) with ``num_steps`` points. As in
  diffusers' img2img pipelines, ``strength`` (the paper's t_ds^max) executes
  N = int(num_steps·strength) steps: the edit starts at ``t_start`` = the N-th grid timestep
  from the bottom and runs the N executed grid steps t_start > ... > t_0 down to clean,
  with deterministic DDIM steps (eta = 0). Step i = 0..N-1 runs at the i-th executed timestep
  from the top.
* **Edit maps.** One non-binary map in [0, 1] per exemplar. Polarity: **1 = keep the source,
  0 = take the exemplar** (``invert_maps=True`` accepts the opposite convention and uses 1 - map).
  Maps are resized to the state's spatial resolution with bilinear interpolation,
  ``align_corners=False``, no antialias (:func:`prepare_map`); a map must have one channel and
  the aspect ratio of the state.
* **Thresholds.** ``threshold(i)`` for i = 0..N-1 over the N executed steps: ``linear`` i/N
  (default), ``quadratic`` (i/N)^2, ``cubic`` (i/N)^3, ``log1p`` log1p(i)/log1p(N), ``sigmoid``
  s(6i/N - 3) (the paper's appendix, s the logistic function: it starts at s(-3) = 0.047, so the
  first step already takes the exemplar wherever the map is <= 0.047), ``sigmoid-normalized``
  (s(6i/N - 3) - s(-3)) / (s(3) - s(-3)) (ours: starts at 0 like the others and would reach 1
  at i = N), or any callable ``f(i, N) -> float`` in [0, 1].
* **Step 0 (the surgical latent).** With m_k = map_k > threshold(0), starting from the noised
  source z = src_T, each exemplar in turn replaces z where its mask is 0:
  z <- z·m_k + ex_k_T·(1 - m_k) (Algorithm 2, line 14, nested for any number of exemplars).
  **Overlaps:** where several maps take an exemplar, the *last* exemplar in the list wins; the
  source survives only where every map keeps it.
* **Steps i >= 1.** With m_k = map_k > threshold(i), the noised source is pinned where every map
  keeps it: z <- src_t·Πm_k + z·(1 - Πm_k), which is Algorithm 2's line 20 nested over any
  number of exemplars. Then z is denoised one DDIM step.
* **Limits, as consequences.** A map of all ones pins the noised source at every step, so the
  output is the source regenerated from its own noise draw: one DDIM step from the noised source
  at the lowest executed timestep. A map of all zeros never pins it: the output is plain DDIM
  generation (SDEdit) from the noised exemplar at t_start.
* **Iterative mode** (:func:`pixels_iterative`): one exemplar per pass, the output of a pass is
  the source of the next (Appendix §2).
* **Guidance.** ``guidance_scale`` > 1 with a conditional backbone uses classifier-free guidance
  ε = ε(∅) + g·(ε(c) - ε(∅)); unconditional backbones refuse a prompt (``Backbone.condition``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.errors import InputError
from diffgeo.io.regions import as_mask, resize_edit_map
from diffgeo.sampling import Grid, Guidance, sample

THRESHOLDS: tuple[str, ...] = ("linear", "quadratic", "cubic", "log1p", "sigmoid",
                               "sigmoid-normalized")
"""Names of the built-in threshold functions (CLI: ``--threshold``)."""

ThresholdFn = Callable[[int, int], float]

__all__ = [
    "THRESHOLDS", "PixelsConfig", "PixelsResult", "edit_start", "grow_and_blur", "pixels_edit",
    "pixels_iterative", "place_exemplar", "prepare_map", "threshold_schedule",
]


# ------------------------------------------------------------------------------ thresholds
def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


_BUILTIN: dict[str, ThresholdFn] = {
    "linear": lambda i, n: i / n,
    "quadratic": lambda i, n: (i / n) ** 2,
    "cubic": lambda i, n: (i / n) ** 3,
    "log1p": lambda i, n: math.log1p(i) / math.log1p(n),
    "sigmoid": lambda i, n: _sigmoid(6 * i / n - 3),
    "sigmoid-normalized": lambda i, n: (_sigmoid(6 * i / n - 3) - _sigmoid(-3))
    / (_sigmoid(3) - _sigmoid(-3)),
}


def threshold_schedule(threshold: str | ThresholdFn, n: int) -> torch.Tensor:
    """The thresholds for steps i = 0..n-1 as a float64 tensor of shape (n,), checked in [0, 1].

    ``threshold`` is one of :data:`THRESHOLDS` or a callable ``f(i, n)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n (the number of executed steps) must be an integer >= 1, got {n!r}")
    if isinstance(threshold, str):
        if threshold not in _BUILTIN:
            raise InputError(f"threshold must be one of {'|'.join(THRESHOLDS)} or a callable "
                             f"f(i, N), got {threshold!r}")
        fn = _BUILTIN[threshold]
    elif callable(threshold):
        fn = threshold
    else:
        raise InputError(f"threshold must be a name ({'|'.join(THRESHOLDS)}) or a callable "
                         f"f(i, N), got {type(threshold).__name__}")
    try:
        values = [float(fn(i, n)) for i in range(n)]
    except InputError:
        raise
    except Exception as exc:  # a user callable that fails is bad input
        raise InputError(f"threshold callable failed: {exc}") from exc
    out = torch.tensor(values, dtype=torch.float64)
    if not bool(torch.isfinite(out).all()) or float(out.min()) < 0 or float(out.max()) > 1:
        raise InputError(f"threshold values must be finite and lie in [0, 1], got "
                         f"{[round(v, 4) for v in values[:8]]}...")
    return out


# ------------------------------------------------------------------------------ edit maps
def prepare_map(m: Any, size: tuple[int, int], *, invert: bool = False,
                name: str = "map") -> torch.Tensor:
    """Validate an edit map and resize it to ``size`` = (h, w) (the state's resolution).

    Accepts (H, W), (1, H, W) or (1, 1, H, W), floats in [0, 1] or booleans. The aspect ratio
    H/W must equal h/w within one pixel of rounding. Resizing is bilinear with
    ``align_corners=False`` and no antialias; a map already at ``size`` is returned unchanged.
    ``invert`` flips the polarity (1 - map) before resizing. After a resize, values within 1e-6
    of 0 or 1 are snapped onto them (step 0 takes an exemplar only where the map is exactly 0).
    Returns float64 (1, 1, h, w).
    """
    m = as_mask(m, name=name, meaning="1 = keep source, 0 = take exemplar")[None, None]
    h, w = size
    H, W = m.shape[-2:]
    if abs(H * w - W * h) > max(h, w, H, W):  # aspect differs by more than one pixel
        raise InputError(f"{name} has aspect {H}x{W} (HxW), which does not match the state's "
                         f"{h}x{w}: bring it to the image's size first (no distorting resize)")
    if invert:
        m = 1.0 - m
    if (H, W) != (h, w):
        m = _snap(resize_edit_map(m, (h, w)))
    return m


def grow_and_blur(mask: Any, grow: int = 0, blur: float = 0.0, *, name: str = "mask"
                  ) -> torch.Tensor:
    """An edit map from a binary region mask (1 = the region where the exemplar goes).

    The region is dilated by ``grow`` pixels (square structuring element), then blurred with a
    Gaussian of standard deviation ``blur`` pixels (reflect padding), and the result is flipped
    to the map polarity: the returned map is 1 - blurred region (1 = keep source). Returns
    (1, 1, H, W) float64 in [0, 1].
    """
    m = as_mask(mask, name=name)[None, None]
    if isinstance(grow, bool) or not isinstance(grow, int) or grow < 0:
        raise InputError(f"grow must be an integer >= 0, got {grow!r}")
    if not isinstance(blur, (int, float)) or isinstance(blur, bool) or not blur >= 0:
        raise InputError(f"blur must be a number >= 0, got {blur!r}")
    m = (m >= 0.5).to(torch.float64)
    if grow > 0:
        m = F.max_pool2d(m, kernel_size=2 * grow + 1, stride=1, padding=grow)
    if blur > 0:
        r = max(1, int(math.ceil(3 * blur)))
        x = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-(x**2) / (2 * blur**2))
        k = k / k.sum()
        pad_h = min(r, m.shape[-2] - 1)
        pad_w = min(r, m.shape[-1] - 1)
        if pad_h > 0 or pad_w > 0:
            m = F.pad(m, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
        kh = k[r - pad_h: r + pad_h + 1]
        kw = k[r - pad_w: r + pad_w + 1]
        m = F.conv2d(m, (kh / kh.sum()).view(1, 1, -1, 1))
        m = F.conv2d(m, (kw / kw.sum()).view(1, 1, 1, -1))
    return _snap(1.0 - m)


def _snap(m: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Clamp to [0, 1] and snap values within ``tol`` of 0 or 1 onto them: step 0 takes an
    exemplar only where a map is exactly 0, so rounding in a blur or resize must not hide it."""
    m = m.clamp(0.0, 1.0)
    m = torch.where(m < tol, torch.zeros_like(m), m)
    return torch.where(m > 1 - tol, torch.ones_like(m), m)


def place_exemplar(exemplar: torch.Tensor, canvas: torch.Tensor, *,
                   offset: tuple[int, int] = (0, 0), scale: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste an exemplar image (1, C, h, w) into a copy of ``canvas`` (1, C, H, W).

    The exemplar is scaled by ``scale`` (bilinear, no antialias, aspect kept) and its top-left
    corner put at ``offset`` = (row, col) canvas pixels; parts outside the canvas are cut. Pass the
    source as ``canvas`` so that uncovered pixels hold source content. Returns (placed image,
    coverage mask (1, 1, H, W): 1 where exemplar pixels landed).
    """
    for nm, v in (("exemplar", exemplar), ("canvas", canvas)):
        if not isinstance(v, torch.Tensor) or v.ndim != 4 or v.shape[0] != 1:
            raise InputError(f"{nm} must be a tensor (1, C, H, W), got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v)}")
    if exemplar.shape[1] != canvas.shape[1]:
        raise InputError(f"exemplar has {exemplar.shape[1]} channels, canvas {canvas.shape[1]}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise InputError(f"scale must be a number > 0, got {scale!r}")
    try:
        oy, ox = (int(v) for v in offset)
    except (TypeError, ValueError) as exc:
        raise InputError(f"offset must be a pair (row, col) of integers, got {offset!r}") from exc
    ex = exemplar.to(canvas.dtype)
    if scale != 1:
        hs = max(1, round(ex.shape[-2] * scale))
        ws = max(1, round(ex.shape[-1] * scale))
        ex = F.interpolate(ex, size=(hs, ws), mode="bilinear", align_corners=False)
    H, W = canvas.shape[-2:]
    h, w = ex.shape[-2:]
    r0, c0 = max(0, oy), max(0, ox)
    r1, c1 = min(H, oy + h), min(W, ox + w)
    if r0 >= r1 or c0 >= c1:
        raise InputError(f"offset {offset!r} with scale {scale} puts the exemplar "
                         f"({h}x{w}) entirely outside the {H}x{W} canvas")
    out = canvas.clone()
    out[..., r0:r1, c0:c1] = ex[..., r0 - oy: r1 - oy, c0 - ox: c1 - ox]
    cover = torch.zeros(1, 1, H, W, dtype=canvas.dtype, device=canvas.device)
    cover[..., r0:r1, c0:c1] = 1
    return out, cover


# ------------------------------------------------------------------------------ the loop
def edit_start(backbone: Backbone, strength: float,
               grid: Grid | int | None = None) -> tuple[int, list[int]]:
    """(t_start, executed timesteps descending) with diffusers' img2img rule: the lowest
    int(num_steps·strength) points of the model's grid, so the same strength does the same
    work (and the same timesteps) in both."""
    g = _executed(backbone, PixelsConfig(strength=strength).strength, grid)
    return g.top, list(reversed(g.timesteps))


def _executed(backbone: Backbone, strength: float, grid: Grid | int | None) -> Grid:
    """The grid points a (checked) strength executes."""
    g = Grid.resolve(backbone, grid)
    n = min(int(g.num_steps * strength), len(g))
    if n < 1:
        raise InputError(f"strength {strength} executes no step of a {g.num_steps}-step grid "
                         f"(int(steps·strength) = 0): raise strength or steps")
    return g.lowest(n)


@dataclass
class PixelsResult:
    """What :func:`pixels_edit` computed, with the settings used.

    ``state``: the edited clean state (1, *state_shape). ``surgical``: the latent of step 0
    before denoising (the surgical latent at t_start). ``masks``: (N, 1, h, w) the combined
    pin mask of every step (1 = noised source pinned). ``maps``: the maps as used (after
    polarity and resizing), (K, 1, h, w). ``timesteps``: the N executed timesteps, descending.
    ``thresholds``: (N,). ``states``: the latent after mixing at every step (when recorded).
    """

    state: torch.Tensor
    surgical: torch.Tensor
    masks: torch.Tensor
    maps: torch.Tensor
    timesteps: list[int]
    thresholds: torch.Tensor
    states: list[torch.Tensor] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _check_states(backbone: Backbone, source: torch.Tensor, exemplars: Sequence[torch.Tensor]):
    backbone.check_state(source, "source")
    if source.shape[0] != 1:
        raise InputError(f"source must be one state (batch 1), got batch {source.shape[0]}")
    if isinstance(exemplars, torch.Tensor):
        raise InputError("exemplars must be a list of states, one per exemplar")
    if len(exemplars) < 1:
        raise InputError("exemplars: give at least one exemplar")
    for k, e in enumerate(exemplars):
        backbone.check_state(e, f"exemplars[{k}]")
        if e.shape[0] != 1:
            raise InputError(f"exemplars[{k}] must be one state (batch 1), got {e.shape[0]}")
    for nm, v in [("source", source), *[(f"exemplars[{k}]", e) for k, e in enumerate(exemplars)]]:
        if not bool(torch.isfinite(v).all()):
            raise InputError(f"{nm} contains NaN or infinite values")


@dataclass(frozen=True)
class PixelsConfig:
    """Settings of progressive exemplar editing (the PIXELS paper's defaults), checked when
    made: ``strength`` in (0, 1] (the paper's t_ds^max: the share of the grid executed),
    ``threshold`` one of :data:`THRESHOLDS` or a callable ``f(i, N)``, ``guidance_scale``
    >= 1 (classifier-free guidance on a conditional model), ``invert_maps`` for maps drawn
    with 1 = take exemplar."""

    strength: float = 0.8
    threshold: str | ThresholdFn = "linear"
    guidance_scale: float = 1.0
    invert_maps: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.strength, bool) or not isinstance(self.strength, int | float) \
                or not 0 < self.strength <= 1:
            raise InputError(f"strength must be a number in (0, 1], got {self.strength!r}")
        if isinstance(self.threshold, str) and self.threshold not in THRESHOLDS:
            raise InputError(f"threshold must be one of {'|'.join(THRESHOLDS)} or a callable "
                             f"f(i, N), got {self.threshold!r}")
        if not isinstance(self.threshold, str) and not callable(self.threshold):
            raise InputError(f"threshold must be a name ({'|'.join(THRESHOLDS)}) or a callable "
                             f"f(i, N), got {type(self.threshold).__name__}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, int | float) or not g >= 1:
            raise InputError(f"guidance_scale must be a number >= 1, got {g!r}")
        if not isinstance(self.invert_maps, bool):
            raise InputError(f"invert_maps must be true or false, got {self.invert_maps!r}")


@torch.no_grad()
def pixels_edit(backbone: Backbone, source: torch.Tensor, exemplars: Sequence[torch.Tensor],
                maps: Sequence[Any], config: PixelsConfig | None = None, *,
                generator: torch.Generator, grid: Grid | int | None = None,
                cond: Conditioning | None = None, uncond: Conditioning | None = None,
                record_states: bool = False) -> PixelsResult:
    """Progressive exemplar editing of ``source`` with any number of exemplars in one pass.

    ``source`` and each exemplar are *states* (``backbone.to_state`` of images in [-1, 1]) of
    batch 1; ``maps`` holds one edit map per exemplar (1 = keep source, 0 = take exemplar;
    ``config.invert_maps`` for the opposite). ``generator`` is required: it supplies the one
    noise draw per image (source first, then exemplars in order). ``grid``: a Grid or a number
    of steps on the model's grid (default 50). See the module docstring for the loop.
    ``config.guidance_scale`` > 1 needs ``uncond`` (the empty-prompt conditioning) and ``cond``.
    """
    cfg = config or PixelsConfig()
    if not isinstance(cfg, PixelsConfig):
        raise InputError(f"config must be a PixelsConfig, got {type(cfg).__name__}")
    strength, threshold = cfg.strength, cfg.threshold
    guidance_scale, invert_maps = cfg.guidance_scale, cfg.invert_maps
    _check_states(backbone, source, exemplars)
    if isinstance(maps, torch.Tensor) and maps.ndim == 4 and len(exemplars) == 1 \
            and maps.shape[0] == 1:
        maps = [maps]
    if isinstance(maps, torch.Tensor) or len(maps) != len(exemplars):
        n_maps = "a tensor" if isinstance(maps, torch.Tensor) else len(maps)
        raise InputError(f"maps: give one edit map per exemplar ({len(exemplars)}), "
                         f"got {n_maps}")
    if not isinstance(generator, torch.Generator):
        raise InputError("generator must be a torch.Generator (explicit RNG: "
                         "torch.Generator().manual_seed(N))")
    if guidance_scale > 1 and (cond is None or uncond is None):
        raise InputError("guidance_scale > 1 needs a conditional model, a prompt (cond) and the "
                         "empty-prompt conditioning (uncond)")
    g = _executed(backbone, strength, grid)
    times = list(reversed(g.timesteps))
    n = len(times)
    thr = threshold_schedule(threshold, n)
    hw = tuple(backbone.state_shape[-2:])
    dev, dt = source.device, source.dtype
    mus = torch.cat([prepare_map(m, hw, invert=invert_maps, name=f"maps[{k}]")
                     for k, m in enumerate(maps)]).to(device=dev, dtype=dt)

    def draw() -> torch.Tensor:
        return torch.randn(source.shape, generator=generator, dtype=dt,
                           device=generator.device).to(dev)

    z_src = draw()
    z_ex = [draw() for _ in exemplars]

    masks: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    surgical = [source]

    def pin(i: int, t: int, x: torch.Tensor) -> torch.Tensor:
        m = (mus > float(thr[i])).to(dt)  # (K, 1, h, w)
        src_t = g.noised(source, z_src, t)
        if i == 0:
            x = src_t
            for k, (e, z) in enumerate(zip(exemplars, z_ex, strict=True)):
                x = x * m[k: k + 1] + g.noised(e, z, t) * (1 - m[k: k + 1])
            surgical[0] = x
        else:
            keep = m.prod(dim=0, keepdim=True)
            x = src_t * keep + x * (1 - keep)
        masks.append(m.prod(dim=0, keepdim=True)[0])
        if record_states:
            states.append(x)
        return x

    guidance = Guidance(guidance_scale, uncond) if guidance_scale > 1 else None
    x = sample(backbone, source, g, cond=cond, guidance=guidance, before_step=pin,
               record=False, desc="exemplar edit").last
    settings = dict(strength=strength, num_steps=g.num_steps, grid=g.to_dict(),
                    t_start=g.top, executed_steps=n,
                    threshold=threshold if isinstance(threshold, str) else "callable",
                    guidance_scale=guidance_scale, invert_maps=invert_maps,
                    exemplars=len(exemplars), map_resize="bilinear, align_corners=False, "
                    "no antialias", polarity="1 = keep source, 0 = take exemplar",
                    overlap="last exemplar wins; source kept where every map keeps it")
    return PixelsResult(state=x, surgical=surgical[0], masks=torch.stack(masks), maps=mus,
                        timesteps=times, thresholds=thr, states=states, settings=settings)


def pixels_iterative(backbone: Backbone, source: torch.Tensor,
                     exemplars: Sequence[torch.Tensor], maps: Sequence[Any],
                     config: PixelsConfig | None = None, *, generator: torch.Generator,
                     **kwargs: Any) -> list[PixelsResult]:
    """One exemplar per pass (Appendix §2): pass k edits the output of pass k-1 with exemplar k.

    Every pass takes ``config`` and the keywords of :func:`pixels_edit`. Noise for every pass
    comes from the same ``generator``, consumed in pass order. Returns one
    :class:`PixelsResult` per pass; the last one's ``state`` is the final edit.
    """
    _check_states(backbone, source, exemplars)
    if isinstance(maps, torch.Tensor) or len(maps) != len(exemplars):
        raise InputError(f"maps: give one edit map per exemplar ({len(exemplars)})")
    results = []
    x = source
    for e, m in zip(exemplars, maps, strict=True):
        r = pixels_edit(backbone, x, [e], [m], config, generator=generator, **kwargs)
        results.append(r)
        x = r.state
    return results
