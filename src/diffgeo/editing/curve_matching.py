"""Curve matching (Algorithm 1 of the generation-curves paper, §4.2, App. B and D).

The noisy state X_t of an image (DDIM inversion, default t = 700) is optimised so that the
generation curves of a region's pixels take a wanted shape; the edited image is regenerated
from X_t at the end. Calling convention: ``image`` / ``state`` have batch 1; ``region`` is a mask
at the model's image size (1 = edit); rates are the differentiable ‖D h_t(X_t)[e_ij]‖ (§4.1).

Per iteration (``iterations`` of them, Adam with ``lr``):
1. draw a source pixel p_k uniformly from the region and a timestep t_k from the normalised
   curve c_a of one pixel drawn at the start (importance sampling; the curve is refreshed every
   ``refresh_every`` iterations, and the reference curve c* too when the reference pixel lies
   inside the region) — ``pixels_per_iteration`` such pairs (p_k, t_k), drawn independently;
2. X_{t_k} = X_t + ΔX with ΔX computed without gradients — ``faithful`` re-integrates the DDIM
   path from the current X_t each iteration (the paper); ``fast`` reuses the ΔX of the path
   computed at the last refresh (DESIGN.md §4), which is identical when refreshing every step,
   and re-walks that path whenever X_t has moved by ``refresh_drift`` (5% by default) since;
3. r = ‖D h_{t_k}(X_{t_k})[e_{p_k}]‖ with gradient — all pairs in one batched JVP, each batch
   element with its own state, timestep and direction — the loss of the task (below) averaged
   over the pairs, an Adam step (then, with ``match_outside_stats``, the region of X_t is
   standardised to the unedited X_t's statistics outside it — our addition, off by default);
4. every ``blend_every`` iterations, if t > ``t_blend``: X_t ← X_t ⊙ A + X_t^orig ⊙ (1 − A)
   (localized modification), with A the region on the state grid.

Losses (``loss``): ``match`` |r − c*(t_k)| (semantic transfer, removal with a reference pixel);
``minimize`` |r| (the pseudo-curve for removal on uniform backgrounds); ``saliency``
λ1·r^λ2 + Σ_i mean|U_i(X_{t_k}) − U_i(X^orig_{t_k})| with decoder feature maps U_i (λ1 = 50,
λ2 = +1 decreases, −1 increases saliency; App. D).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.curves import pixel_direction, rates_at
from diffgeo.errors import InputError
from diffgeo.io.regions import region_pixels
from diffgeo.jacobian import central_difference, jvp
from diffgeo.runtime import resolve_dtype, strict_float32
from diffgeo.sampling import Grid, Step, generate, invert, sample, walk
from diffgeo.timing import PhaseClock

LOSSES = ("match", "minimize", "saliency")
MODES = ("fast", "faithful")
WALK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: How the rates' derivative D h[e_p] is taken: ``exact`` by forward-mode AD (the paper; the
#: gradient is reverse-over-forward), ``difference`` by a central difference of h along e_p
#: (one plain forward of 2B states, an ordinary backward pass; fast mode's default).
DERIVATIVES = ("exact", "difference")
#: The central difference's step along the unit direction e_p. States at the levels curve
#: matching samples have entries of order 1 on every model we load, so one absolute step
#: serves: it balances the O(s²) truncation against float32 rounding (measured against the
#: exact JVP in tests/test_curve_matching.py; benchmarks/curve_matching_speed.py).
DIFFERENCE_STEP = 0.03
#: The phases of a run that ``CurveMatchingResult.cost`` times: inversion and the original path
#: with its curves (setup); per iteration the derivative-free path walk (faithful mode's walk to
#: the sampled levels, fast mode's refresh walks), fast mode's drift re-walks (extended only as
#: far as the sampled levels need), the curves a refresh recomputes, the rates' batched JVP with
#: the loss (derivative), the backward pass through it, and Adam with the blends (update); then
#: snapshots and the final decode.
PHASES = ("setup", "walk", "re-walk", "curves", "derivative", "backward", "update",
          "snapshots", "decode")
#: Pairs per iteration in fast mode: one batched JVP for all of them (4 pairs cost 1.1x one pair
#: per iteration on the default model on a 2-core CPU, benchmarks/curve_matching_speed.py), a
#: quarter of the gradient variance of the paper's single pair.
FAST_PIXELS_PER_ITERATION = 4
#: Fast mode re-walks its path once X_t has moved by this fraction of its norm since the last
#: walk (``refresh_drift=None``): the reused ΔX goes stale in proportion to that move.
FAST_REFRESH_DRIFT = 0.05
#: The paper's X_t level (App. D); a config without ``t`` takes the model's grid point nearest it.
PAPER_T = 700
#: Iterations of a config that names none (semantic transfer and removal, §5; App. D).
DEFAULT_ITERATIONS = 300


def _walk_dtype(name: Any) -> Any:
    try:
        return resolve_dtype(name)
    except InputError:
        return None


@dataclass
class CurveMatchingConfig:
    """Settings of Algorithm 1; defaults from the paper (App. D), except ``decode_blend``
    (our addition, on by default: see :func:`blended_decode`; ``False`` decodes as the paper)
    and ``pixels_per_iteration`` (``None``: one pair per iteration in ``faithful`` mode, as the
    paper, and :data:`FAST_PIXELS_PER_ITERATION` in ``fast`` mode). ``match_outside_stats``
    (ours, off by default) projects the region of X_t after every step onto the noise
    statistics of the unedited X_t outside it: see :func:`match_outside_statistics`.
    ``refresh_drift`` (ours, fast mode only; ``None``: :data:`FAST_REFRESH_DRIFT`; 0: off)
    also re-walks the path whenever X_t has moved by more than that
    fraction of its norm since the last walk: fast mode's reused ΔX goes stale in proportion
    to that move (each iteration's value is in the history as ``drift``, and ``rewalked`` says
    where it triggered). A re-walk renews the path only; the sampling curve c_a (and c*) keep
    the ``refresh_every`` schedule, so with a tolerance of 0+ fast mode equals faithful mode.
    Without ``localized`` nothing is blended, neither X_t nor the decode. ``t=None`` takes the
    model's grid point nearest the paper's 700 (:meth:`on_grid`). ``iterations=None``
    takes the task's default (:data:`DEFAULT_ITERATIONS`; the saliency and blending presets in
    ``tasks`` use the paper's 70 and 100).

    Cost settings (ours; they change no formula): ``walk_dtype`` (``"bfloat16"``/``"float16"``;
    ``None``: the model's dtype) runs the derivative-free walks of the iterations (ΔX, refreshes,
    re-walks) under autocast in that precision — the derivative and the update stay in the
    model's dtype; ``pairs_per_jvp`` (``None``: all pairs at once) splits the iteration's pairs
    into chunks of that many, each differentiated and back-propagated on its own with the
    gradients summed, which bounds the memory of reverse-over-forward at the same result.

    ``derivative`` (ours; ``None``: ``difference`` in fast mode on a float32/float64 model,
    ``exact`` otherwise) takes the rates D h[e_p] of the loss and of the refreshed curves
    ``exact``-ly (forward-mode AD, as the paper) or by a central ``difference`` of h along e_p
    with step :data:`DIFFERENCE_STEP` — an O(s²) approximation that needs no forward-mode AD,
    so the model keeps its fast attention kernels and the gradient is one plain backward pass.
    Every curve of a run takes the same derivative (the original path's, which set the sampling
    curve and the reference, the refreshed ones and the reported curves before/after), so the
    loss compares rates of one estimator and the one-time curves cost plain forwards too."""

    t: int | None = None
    num_steps: int = 50
    iterations: int | None = None
    lr: float = 0.02
    refresh_every: int = 50
    refresh_drift: float | None = None
    blend_every: int = 70
    t_blend: int = 500
    mode: str = "fast"
    loss: str = "match"
    lambda1: float = 50.0
    lambda2: float = 1.0
    feature_weight: float = 1.0
    localized: bool = True
    decode_blend: bool = True
    snapshot_every: int = 0
    pixels_per_iteration: int | None = None
    match_outside_stats: bool = False
    walk_dtype: str | None = None
    pairs_per_jvp: int | None = None
    derivative: str | None = None
    seed: int = 0

    @property
    def drift_tolerance(self) -> float:
        """The relative move of X_t that triggers a drift refresh (0: never)."""
        if self.refresh_drift is not None:
            return self.refresh_drift
        return FAST_REFRESH_DRIFT if self.mode == "fast" else 0.0

    def on_grid(self, grid: Grid) -> CurveMatchingConfig:
        """This config with ``t`` on ``grid``: the given t (checked), or the grid point nearest
        :data:`PAPER_T` when none was given (701 on a Stable Diffusion config)."""
        return replace(self, t=grid.nearest(PAPER_T) if self.t is None else grid.check(self.t))

    @property
    def budget(self) -> int:
        """The number of iterations this config runs."""
        return DEFAULT_ITERATIONS if self.iterations is None else self.iterations

    def derivative_for(self, dtype: torch.dtype) -> str:
        """How this config takes the rates' derivative on a model running in ``dtype``: the
        given one (a difference on a half-precision model is refused: its rounding error,
        ulp·|h|/s, would swamp the rate), else ``difference`` in fast mode on float32/float64
        and ``exact`` otherwise."""
        full = dtype in (torch.float32, torch.float64)
        if self.derivative == "difference" and not full:
            raise InputError(f"derivative 'difference' needs a float32 or float64 model (this one "
                             f"runs in {str(dtype).replace('torch.', '')}): use 'exact'")
        if self.derivative is not None:
            return self.derivative
        return "difference" if self.mode == "fast" and full else "exact"

    @property
    def batch(self) -> int:
        """The number of (pixel, timestep) pairs each iteration averages over."""
        if self.pixels_per_iteration is not None:
            return self.pixels_per_iteration
        return FAST_PIXELS_PER_ITERATION if self.mode == "fast" else 1

    def validate(self) -> None:
        for name in ("iterations", "refresh_every", "blend_every", "num_steps"):
            v = getattr(self, name)
            if name == "iterations" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        ppi = self.pixels_per_iteration
        if ppi is not None and (isinstance(ppi, bool) or not isinstance(ppi, int) or ppi < 1):
            raise InputError(f"pixels_per_iteration must be an integer >= 1 (or None for the "
                             f"mode's default), got {ppi!r}")
        if self.snapshot_every < 0:
            raise InputError(f"snapshot_every must be >= 0, got {self.snapshot_every}")
        if isinstance(self.t_blend, bool) or not isinstance(self.t_blend, int) \
                or self.t_blend < 0:
            raise InputError(f"t_blend must be an integer timestep >= 0, got {self.t_blend!r}")
        if not 0 < self.lr < float("inf"):
            raise InputError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.lambda1 < float("inf"):
            raise InputError(f"lambda1 must be a finite number > 0, got {self.lambda1}")
        rd = self.refresh_drift
        if rd is not None and (isinstance(rd, bool) or not isinstance(rd, (int, float))
                               or not 0 <= rd < float("inf")):
            raise InputError(f"refresh_drift must be a finite number >= 0 (0: off; None: the "
                             f"mode's default), got {rd!r}")
        if rd and self.mode == "faithful":
            raise InputError("refresh_drift applies to fast mode only: faithful mode "
                             "re-integrates the path from X_t every iteration (give 0 or None)")
        if not 0 <= self.feature_weight < float("inf"):
            raise InputError(f"feature_weight must be a finite number >= 0, got "
                             f"{self.feature_weight}")
        ppj = self.pairs_per_jvp
        if ppj is not None and (isinstance(ppj, bool) or not isinstance(ppj, int) or ppj < 1):
            raise InputError(f"pairs_per_jvp must be an integer >= 1 (or None: all pairs in one "
                             f"JVP), got {ppj!r}")
        if self.derivative is not None and self.derivative not in DERIVATIVES:
            raise InputError(f"derivative must be one of {DERIVATIVES} (or None: the mode's "
                             f"default), got {self.derivative!r}")
        if self.walk_dtype is not None and _walk_dtype(self.walk_dtype) not in WALK_DTYPES:
            raise InputError(f"walk_dtype must be float32, bfloat16 or float16 (or None: the "
                             f"model's dtype), got {self.walk_dtype!r}")
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "saliency" and self.lambda2 == 0:
            raise InputError("lambda2 must be non-zero (+1 decreases, -1 increases saliency)")


@dataclass
class CurveMatchingResult:
    """The edited image, the optimised X_t, per-iteration history and curves before/after."""

    image: torch.Tensor
    state: torch.Tensor
    history: list[dict[str, Any]]
    timesteps: list[int]
    region_curve_before: torch.Tensor
    region_curve_after: torch.Tensor
    reference_curve: torch.Tensor | None
    snapshots: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    #: Where the run's time went: ``{"phases": {phase: {"seconds", "entries"}}, "walk_steps",
    #: "rewalk_steps", "path_steps"}`` (see :data:`PHASES`). Not in ``settings``: it varies from
    #: run to run.
    cost: dict[str, Any] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def rates_batch(backbone: Backbone, x: torch.Tensor, t: Sequence[int], v: torch.Tensor,
                cond: Conditioning | None, derivative: str = "exact") -> torch.Tensor:
    """‖D h_{t_i}(x_i)[v_i]‖ for B states (B, *state), B timesteps and B directions: (B,).

    One batched JVP (``exact``, differentiable with respect to x by reverse over forward) or
    one batched central difference of h (``difference``, step :data:`DIFFERENCE_STEP`; plain
    reverse mode). The U-Net treats batch elements independently, so each norm equals the
    single-state rate.
    """
    if derivative not in DERIVATIVES:
        raise InputError(f"derivative must be one of {DERIVATIVES}, got {derivative!r}")
    B = x.shape[0]
    if len(t) != B or v.shape[0] != B:
        raise InputError(f"rates_batch needs one timestep and one direction per state: got "
                         f"{B} states, {len(t)} timesteps, {v.shape[0]} directions")
    tt = torch.as_tensor([int(s) for s in t], dtype=torch.long)
    c = cond.expand(B) if cond is not None else None
    if derivative == "difference":
        jv = central_difference(backbone, x, v.to(x), tt, c, output="h", step=DIFFERENCE_STEP)
    else:
        _, jv = jvp(backbone, x, v.to(x), tt, c, output="h")
    return jv.flatten(1).norm(dim=1)


#: Path levels per batched call when a curve is taken by differences.
CURVE_CHUNK = 16


def curve_of(backbone: Backbone, path: dict[int, torch.Tensor], pixel: Sequence[int],
             cond: Conditioning | None, derivative: str = "exact") -> torch.Tensor:
    """The ‖Dh[e_p]‖ curve of one pixel over the path's timesteps (ascending), no gradient;
    ``difference`` takes :data:`CURVE_CHUNK` levels per call."""
    v = pixel_direction(backbone, pixel)[None]
    levels = sorted(path)
    if derivative == "exact":
        return torch.stack([rates_at(backbone, path[t], t, v, "h", cond=cond)[0].detach()
                            for t in levels]).float().cpu()
    with torch.no_grad():
        return torch.cat([
            rates_batch(backbone, torch.cat([path[t] for t in part]), part,
                        v.expand(len(part), *v.shape[1:]), cond, derivative)
            for part in (levels[s:s + CURVE_CHUNK] for s in range(0, len(levels), CURVE_CHUNK))
        ]).float().cpu()


class PathCache:
    """The DDIM path 𝒳(X_t) through one state, walked only as far as it has been asked for.

    Extending it continues the walk from the farthest state held on that side, so a state read
    from the cache is the one a single walk from X_t would reach (the DDIM and flow steps are
    one-step maps: a step depends on its input state and level only). ``steps`` counts the
    network calls its walks made.
    """

    def __init__(self, backbone: Backbone, x: torch.Tensor, t: int, grid: Grid,
                 cond: Conditioning | None) -> None:
        self.backbone, self.t, self.grid, self.cond = backbone, t, grid, cond
        self.states: dict[int, torch.Tensor] = {t: x}
        self.steps = 0

    def _walk(self, start: int, target: int) -> None:
        walked = walk(self.backbone, self.states[start], start, target, self.grid, self.cond)
        self.steps += len(walked) - 1
        self.states.update(walked)

    def extend(self, targets: Sequence[int]) -> PathCache:
        """Walk on (down and/or up) until every target level is held."""
        lowest, highest = min(targets), max(targets)
        if lowest < min(self.states):
            self._walk(min(self.states), lowest)
        if highest > max(self.states):
            self._walk(max(self.states), highest)
        return self

    def complete(self) -> PathCache:
        """The whole path, from the bottom to the top of the grid."""
        return self.extend([self.grid.bottom, self.grid.top])

    def __getitem__(self, level: int) -> torch.Tensor:
        return self.extend([level]).states[level]


def full_path(backbone: Backbone, x_t: torch.Tensor, t: int, grid: Grid | int,
              cond: Conditioning | None) -> dict[int, torch.Tensor]:
    """𝒳(X_t): every grid state, from the bottom to the top of the grid, through X_t."""
    return PathCache(backbone, x_t, t, Grid.resolve(backbone, grid), cond).complete().states


def walk_to(backbone: Backbone, x: torch.Tensor, t: int, targets: Sequence[int],
            grid: Grid | int, cond: Conditioning | None) -> dict[int, torch.Tensor]:
    """The DDIM path from X_t to every target level: one walk down to the lowest target below
    t and one up to the highest above it, so a batch of targets costs no more than the
    farthest one on each side."""
    return PathCache(backbone, x, t, Grid.resolve(backbone, grid), cond).extend(targets).states


def _sample_t(curve: torch.Tensor, timesteps: list[int], gen: torch.Generator) -> int:
    p = curve.clamp_min(0).double()
    p = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1 / len(p))
    return timesteps[int(torch.multinomial(p, 1, generator=gen))]


def _inside_with_outside(mask: torch.Tensor) -> torch.Tensor:
    """The region's cells (mask > 0.5) on the state grid; refuses a region with no outside."""
    inside = mask[0, 0] > 0.5
    if not bool(inside.any()) or bool(inside.all()):
        raise InputError("match_outside_stats needs a region with pixels both inside and "
                         "outside it on the state grid")
    return inside


def match_outside_statistics(x: torch.Tensor, reference: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """``x`` with its region (mask > 0.5) standardised per channel to the mean and standard
    deviation of ``reference`` outside the region (mask <= 0.5).

    Why: unconstrained, the optimiser drives the region of X_t far off the statistics of an
    inverted noisy image (values up to 6 where the background's have std 0.4 on the default
    model), and the decode then paints a new, saturated object instead of background. Keeping
    the region's first two moments equal to the background's leaves the optimiser the spatial
    pattern only. Measured in benchmarks/curve_matching_gates.py (removal).
    """
    inside = _inside_with_outside(mask)
    xi, ro = x[:, :, inside], reference[:, :, ~inside]
    z = xi - xi.mean(-1, keepdim=True)
    if xi.shape[-1] > 1:
        z = z / xi.std(-1, unbiased=False, keepdim=True).clamp_min(1e-8)
    out = x.clone()
    out[:, :, inside] = ro.mean(-1, keepdim=True) + z * ro.std(-1, unbiased=False, keepdim=True)
    return out


def paste_outside(edited: torch.Tensor, original: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """X̄ ⊙ A + X ⊙ Ā: the edited state inside the region, the original outside (§4.2's
    localized modification; also the final blend and every level of ``blended_decode``)."""
    return edited * mask + original * (1 - mask)


def blended_decode(backbone: Backbone, x: torch.Tensor, orig_path: dict[int, torch.Tensor],
                   mask: torch.Tensor, cfg: CurveMatchingConfig, grid: Grid | int,
                   cond: Conditioning | None) -> torch.Tensor:
    """DDIM generation from the edited X_t that pastes the original path outside the region at
    every level above t_blend, then generates freely below it.

    An extension, not the paper's: on a small image every pixel of X_t is inside the U-Net's
    receptive field, so the paper's decode lets an edited region repaint the whole image at high
    noise; pasting the unedited path outside down to t_blend keeps the outside to what the
    low-noise steps (which also seam the boundary) change. On the default model's held-out
    scenes (benchmarks/curve_matching_gates.py) it cut the outside MSE of removal and saliency
    edits 2-2.5x and raised the share of saliency increases that work from 62% to 75%.
    """
    def paste(step: Step) -> torch.Tensor:
        if step.t_to is not None and cfg.t_blend < step.t_to < cfg.t:
            return paste_outside(step.x_to, orig_path[step.t_to], mask)
        return step.x_to

    g = Grid.resolve(backbone, grid)
    cfg = cfg.on_grid(g)
    g = g.up_to(cfg.t)
    return sample(backbone, x, g, cond=cond, on_step=paste, record=False).last


#: Called after every iteration with (iteration, history entry, snapshot image or None).
IterationObserver = Callable[[int, dict[str, Any], "torch.Tensor | None"], None]
_observers: ContextVar[tuple[IterationObserver, ...]] = ContextVar("curve_matching_observers",
                                                                   default=())


@contextlib.contextmanager
def observe_iterations(observer: IterationObserver) -> Iterator[None]:
    """Within the block, every curve-matching run calls ``observer`` after each iteration —
    how a face shows a live loss plot without the verbs carrying a callback. An exception the
    observer raises stops the run (a cancel button) and propagates to the caller."""
    token = _observers.set((*_observers.get(), observer))
    try:
        yield
    finally:
        _observers.reset(token)


def curve_matching(backbone: Backbone, image: torch.Tensor, region: Any,
                   config: CurveMatchingConfig | None = None, *,
                   reference_pixel: Sequence[int] | None = None,
                   cond: Conditioning | None = None,
                   progress: bool = False) -> CurveMatchingResult:
    """Algorithm 1 on an image in [-1, 1] (1, C, H, W) and a region mask (H, W)."""
    cfg = config or CurveMatchingConfig()
    cfg.validate()
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"image must have shape (1, C, H, W), got {tuple(image.shape)}")
    pixels = region_pixels(region, backbone.image_size)
    if cfg.loss == "match":
        if reference_pixel is None:
            raise InputError("loss 'match' needs a reference pixel (--reference R,C)")
        H, W = backbone.image_size
        if not (0 <= reference_pixel[0] < H and 0 <= reference_pixel[1] < W):
            raise InputError(f"reference pixel {tuple(reference_pixel)} is outside the "
                             f"{H}x{W} image")
    grid = Grid.for_model(backbone, cfg.num_steps)
    cfg = cfg.on_grid(grid)  # t on the grid, before any work
    derivative = cfg.derivative_for(backbone.dtype)
    # A difference divides rounding by 2s: TF32's 10 mantissa bits would show, so its forward,
    # backward and curves run in true float32.
    precise = strict_float32 if derivative == "difference" else contextlib.nullcontext
    gen = torch.Generator().manual_seed(cfg.seed)
    dev, dt = backbone.device, backbone.dtype
    clock = PhaseClock(dev)
    with clock.phase("setup"), torch.no_grad():
        x0 = backbone.to_state(image.to(dev, dt))
        x_orig = invert(backbone, x0, cfg.t, grid, cond).last
    mask = backbone.state_region(region)
    if cfg.match_outside_stats:
        _inside_with_outside(mask)  # refuse before any optimisation
    ref_inside = reference_pixel is not None and any(
        (p == np.asarray(reference_pixel)).all() for p in pixels)
    a_pixel = tuple(int(v) for v in pixels[int(torch.randint(len(pixels), (1,), generator=gen))])

    with clock.phase("setup"):
        orig_path = full_path(backbone, x_orig, cfg.t, grid, cond)
        timesteps = sorted(orig_path)
        with precise():
            region_before = curve_of(backbone, orig_path, a_pixel, cond, derivative)
            c_ref = (curve_of(backbone, orig_path, reference_pixel, cond, derivative)
                     if reference_pixel is not None else None)
    c_a = region_before
    feats_orig: dict[int, list[torch.Tensor]] = {}

    def pair_losses(x_k: torch.Tensor, tks: list[int], ps: list[tuple[int, int]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rates, losses) of a chunk of pairs, differentiable w.r.t. X_t."""
        v = torch.stack([pixel_direction(backbone, p) for p in ps])
        r = rates_batch(backbone, x_k, tks, v, cond, derivative)
        js = [timesteps.index(tk) for tk in tks]
        if cfg.loss == "match":
            assert c_ref is not None
            return r, (r - c_ref[js].to(r)).abs()
        if cfg.loss == "minimize":
            return r, r.abs()
        per_pair = cfg.lambda1 * r.clamp_min(1e-12) ** cfg.lambda2
        if cfg.feature_weight:
            for tk in set(tks) - set(feats_orig):
                with torch.no_grad():
                    feats_orig[tk] = backbone.features(orig_path[tk], tk, cond)
            feats = backbone.features(x_k, torch.as_tensor(tks), cond.expand(
                len(tks)) if cond is not None else None)
            per_pair = per_pair + cfg.feature_weight * sum(
                (a - torch.cat([feats_orig[tk][n] for tk in tks])).abs().flatten(1).mean(1)
                for n, a in enumerate(feats))
        return r, per_pair

    x = x_orig.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    path = PathCache(backbone, x_orig, cfg.t, grid, cond)
    path.states = orig_path
    history: list[dict[str, Any]] = []
    snapshots: list[tuple[int, torch.Tensor]] = []
    x_refreshed, refreshes = x_orig, 0
    walk_steps = rewalk_steps = 0
    tolerance = cfg.drift_tolerance
    observers = _observers.get()
    chunk = cfg.pairs_per_jvp or cfg.batch
    walk_dtype = dt if cfg.walk_dtype is None else resolve_dtype(cfg.walk_dtype)

    @contextlib.contextmanager
    def walking(phase: str) -> Iterator[None]:
        # Derivative-free walks only: autocast never reaches the JVP, the loss or the update.
        with clock.phase(phase), torch.no_grad(), (
                torch.autocast(dev.type, dtype=walk_dtype) if walk_dtype != dt
                else contextlib.nullcontext()):
            yield

    for it in tqdm(range(cfg.budget), desc=f"curve matching ({cfg.loss})",
                   disable=not progress):
        # How far X_t has moved since the path was last computed: fast mode's ΔX error grows
        # with it (the reused ΔX assumes the walk's Jacobian is the identity along the move).
        drift = float((x.detach() - x_refreshed).norm() / x_refreshed.norm().clamp_min(1e-12))
        periodic = it > 0 and it % cfg.refresh_every == 0
        # A drift refresh renews only what goes stale with the move (the path, hence fast
        # mode's ΔX); the curves that steer sampling keep the paper's schedule. It walks only
        # as far as the levels sampled until the next refresh need (PathCache).
        rewalk = not periodic and it > 0 and tolerance > 0 and drift > tolerance
        if periodic or rewalk:
            path = PathCache(backbone, x.detach().clone(), cfg.t, grid, cond)
            x_refreshed = path.states[cfg.t]
        steps_before = path.steps
        if periodic:
            refreshes += 1
            with walking("walk"):
                path.complete()
            with clock.phase("curves"), precise():
                c_a = curve_of(backbone, path.states, a_pixel, cond, derivative)
                if ref_inside:
                    c_ref = curve_of(backbone, path.states, reference_pixel, cond, derivative)
        # Pixel then timestep per pair, so one pair per iteration draws as the paper does.
        ps, tks = [], []
        for _ in range(cfg.batch):
            ps.append(tuple(int(v) for v in
                            pixels[int(torch.randint(len(pixels), (1,), generator=gen))]))
            tks.append(_sample_t(c_a, timesteps, gen))
        if cfg.mode == "faithful":
            with walking("walk"):
                here = PathCache(backbone, x.detach(), cfg.t, grid, cond).extend(tks)
            walk_steps += here.steps
            delta = torch.cat([here.states[tk] - x.detach() for tk in tks])
        else:
            with walking("re-walk"):
                path.extend(tks)
            delta = torch.cat([path.states[tk] - path.states[cfg.t] for tk in tks]).detach()
        if periodic:
            walk_steps += path.steps - steps_before
        elif cfg.mode == "fast":
            rewalk_steps += path.steps - steps_before
        delta = delta.to(dt)
        opt.zero_grad(set_to_none=True)
        rs, losses = [], []
        for s in range(0, cfg.batch, chunk):
            part = slice(s, s + chunk)
            with clock.phase("derivative"), precise():
                r_part, loss_part = pair_losses(x + delta[part], tks[part], ps[part])
            with clock.phase("backward"), precise():
                # the mean over all pairs, one chunk at a time: the gradients add up in x.grad
                (loss_part.sum() / cfg.batch).backward()
            rs.append(r_part.detach())
            losses.append(loss_part.detach())
        r, per_pair = torch.cat(rs), torch.cat(losses)
        loss = per_pair.mean()
        blended = False
        with clock.phase("update"):
            opt.step()
            if cfg.match_outside_stats:
                with torch.no_grad():
                    x.copy_(match_outside_statistics(x, x_orig, mask))
            if cfg.localized and cfg.t > cfg.t_blend and (it + 1) % cfg.blend_every == 0:
                with torch.no_grad():
                    x.copy_(paste_outside(x, x_orig, mask))
                blended = True
        history.append({"iteration": it, "loss": loss.item(), "rate": r.mean().item(),
                        "blended": blended, "drift": drift, "rewalked": rewalk,
                        "walk_steps": (here.steps if cfg.mode == "faithful"
                                       else path.steps - steps_before),
                        "samples": [{"pixel": list(p), "t_k": tk, "rate": float(ri),
                                     "loss": float(li)}
                                    for p, tk, ri, li in zip(ps, tks, r, per_pair,
                                                             strict=True)]})
        if cfg.snapshot_every and (it + 1) % cfg.snapshot_every == 0:
            with clock.phase("snapshots"), torch.no_grad():
                snap = generate(backbone, x.detach(), cfg.t, grid, cond).last
                snapshots.append((it + 1, backbone.to_image(snap).clamp(-1, 1).cpu()))
        for observer in observers:
            observer(it, history[-1], snapshots[-1][1] if snapshots and snapshots[-1][0] == it + 1
                     else None)
    final_blend = bool(cfg.localized and cfg.t > cfg.t_blend and history
                       and not history[-1]["blended"])
    with clock.phase("decode"):
        if final_blend:
            # Iterations after the last periodic blend moved the outside too; without this the
            # final image would change outside the region whenever iterations % blend_every != 0.
            with torch.no_grad():
                x.copy_(paste_outside(x, x_orig, mask))
        with torch.no_grad():
            final_path = full_path(backbone, x.detach(), cfg.t, grid, cond)
            if cfg.localized and cfg.decode_blend:
                x_clean = blended_decode(backbone, x.detach(), orig_path, mask, cfg, grid, cond)
            else:
                # final_path already holds the generation down to the lowest grid level (the
                # same DDIM steps generate takes); only the last step to the clean image is left.
                lowest = timesteps[0]
                x_clean = generate(backbone, final_path[lowest], lowest, grid, cond).last
            out = backbone.to_image(x_clean).clamp(-1, 1)
        with precise():
            region_after = curve_of(backbone, final_path, a_pixel, cond, derivative)
    settings = dict(cfg.__dict__, iterations=cfg.budget, final_blend=final_blend,
                    derivative=derivative,
                    pixels_per_iteration=cfg.batch,
                    refresh_drift=tolerance, refreshes=refreshes,
                    drift_refreshes=sum(h["rewalked"] for h in history),
                    decode_blend=bool(cfg.localized and cfg.decode_blend),
                    reference_pixel=list(reference_pixel) if reference_pixel else None,
                    curve_pixel=list(a_pixel), region_pixels=len(pixels), grid=grid.to_dict())
    cost = {"phases": clock.report(), "walk_steps": walk_steps, "rewalk_steps": rewalk_steps,
            "path_steps": len(timesteps) - 1}
    return CurveMatchingResult(out.cpu(), x.detach(), history, timesteps, region_before,
                               region_after, c_ref, snapshots, settings, cost)
