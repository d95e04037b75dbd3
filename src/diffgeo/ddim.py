"""Deterministic DDIM (Eq. 4 of the generation-curves paper): steps, inversion and generation.

One integer grid serves both directions. With ``num_steps`` steps over T training timesteps the
grid is diffusers' (``leading``: 0, T/N, 2T/N, ...; ``trailing`` also available). The clean image
sits *before* the grid's first point with alpha_bar = 1 (diffusers' ``set_alpha_to_one``), so

    inversion:  clean --ε(x, t_0)--> X_{t_0} --ε(X_{t_0}, t_1)--> X_{t_1} ... --> X_{t_stop}
    generation: X_{t_stop} --ε(X_{t_stop}, t_stop)--> ... X_{t_0} --ε(X_{t_0}, t_0)--> clean

Each generation step x_to = A·x_from + B·ε with A = sqrt(ab_to/ab_from) and
B = sqrt(1 - ab_to) - sqrt(ab_to (1 - ab_from) / ab_from) (Eq. 8's A(t), B(t)). Inversion uses the
same formula with ε evaluated at the state it starts from, as diffusers' ``DDIMInverseScheduler``
does, which generation only approximately undoes. The ``exact`` inversion mode solves, per step,
for the X_{t_i} that the generation step maps back onto X_{t_{i-1}}, by fixed-point iteration
x ← (X_{t_{i-1}} - B·ε(x, t_i)) / A, and reports the residual of every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.errors import InputError

SPACINGS = ("leading", "trailing")


def ddim_grid(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
              offset: int = 0) -> list[int]:
    """The ascending integer grid diffusers' DDIM schedulers use for ``num_steps`` steps."""
    T = num_train_timesteps
    if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise InputError(f"steps must be an integer in 1..{T}, got {num_steps!r}")
    if spacing == "leading":
        ratio = T // num_steps
        grid = [i * ratio + offset for i in range(num_steps)]
    elif spacing == "trailing":
        # diffusers' own expression: rounding halves the same way keeps the grids identical.
        grid = sorted(int(v) - 1 for v in np.round(np.arange(T, 0, -T / num_steps)[:num_steps]))
    else:
        raise InputError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if grid[0] < 0 or grid[-1] >= T:
        raise InputError(f"offset {offset} moves the grid outside 0..{T - 1}")
    return grid


def grid_up_to(backbone: Backbone, t_stop: int, num_steps: int, spacing: str = "leading",
               offset: int = 0) -> list[int]:
    """Grid points 0..t_stop (t_stop must be on the grid: no silent rounding of timesteps)."""
    if isinstance(t_stop, bool) or not isinstance(t_stop, int):
        raise InputError(f"t must be an integer timestep, got {t_stop!r}")
    grid = ddim_grid(backbone.num_train_timesteps, num_steps, spacing, offset)
    if t_stop not in grid:
        near = sorted(grid, key=lambda g: abs(g - t_stop))[:2]
        raise InputError(f"t={t_stop} is not on the {num_steps}-step {spacing} grid "
                         f"(step {grid[1] - grid[0] if len(grid) > 1 else 0}); nearest grid "
                         f"timesteps: {sorted(near)}")
    return [g for g in grid if g <= t_stop]


def alpha_bar(backbone: Backbone, t: int | None) -> float:
    """alpha_bar at grid timestep t; ``None`` denotes the clean image (alpha_bar = 1)."""
    return 1.0 if t is None else float(backbone.alphas_cumprod[t])


def step_coefficients(ab_from: float, ab_to: float) -> tuple[float, float]:
    """A, B with x_to = A·x_from + B·ε (Eq. 4 rearranged; Eq. 8's A(t), B(t))."""
    a = (ab_to / ab_from) ** 0.5
    b = (1 - ab_to) ** 0.5 - (ab_to * (1 - ab_from) / ab_from) ** 0.5
    return a, b


def predict_x0(backbone: Backbone, x: torch.Tensor, t: int, cond: Conditioning | None = None,
               eps: torch.Tensor | None = None) -> torch.Tensor:
    """x̂0 = (x - sqrt(1 - ab)·ε) / sqrt(ab)."""
    eps = backbone.eps(x, t, cond) if eps is None else eps
    ab = alpha_bar(backbone, t)
    return (x - (1 - ab) ** 0.5 * eps) / ab**0.5


def ddim_step(backbone: Backbone, x: torch.Tensor, t_from: int | None, t_to: int | None,
              eps: torch.Tensor) -> torch.Tensor:
    """Move x from level t_from to t_to (either direction) with a given ε (Eq. 4)."""
    a, b = step_coefficients(alpha_bar(backbone, t_from), alpha_bar(backbone, t_to))
    return a * x + b * eps


@dataclass
class Trajectory:
    """States along one DDIM path, ordered in the direction it was computed.

    ``timesteps[i]`` is the level of ``states[i]``; ``None`` is the clean level (alpha_bar = 1).
    """

    timesteps: list[int | None]
    states: list[torch.Tensor]
    direction: str  # "inversion" | "generation"
    settings: dict[str, Any] = field(default_factory=dict)
    residuals: list[float] = field(default_factory=list)  # exact mode: per-step round-trip error
    iterations: list[int] = field(default_factory=list)   # exact mode: per-step iterations

    def at(self, t: int | None) -> torch.Tensor:
        if t not in self.timesteps:
            raise InputError(f"timestep {t} is not on this trajectory "
                             f"({[s for s in self.timesteps if s is not None][:3]}...)")
        return self.states[self.timesteps.index(t)]

    @property
    def first(self) -> torch.Tensor:
        return self.states[0]

    @property
    def last(self) -> torch.Tensor:
        return self.states[-1]

    def stacked(self) -> torch.Tensor:
        """All states as one tensor (N, B, ...)."""
        return torch.stack(self.states)

    def grid(self) -> list[int]:
        return [t for t in self.timesteps if t is not None]


def _check_start(backbone: Backbone, x: torch.Tensor, name: str) -> None:
    backbone.check_state(x, name)
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")


def _solve_inversion_step(backbone: Backbone, x_prev: torch.Tensor, x: torch.Tensor,
                          t_prev: int | None, t: int, cond: Conditioning | None, tol: float,
                          max_iter: int) -> tuple[torch.Tensor, float, int]:
    """Find x with gen_step(x) = x_prev by damped fixed-point iteration.

    The plain iteration x <- (x_prev - B·ε(x, t)) / A contracts when |B/A|·‖Dε‖ < 1, which holds
    for trained models and small steps but not always (large steps, untrained networks). The
    relaxation factor is halved whenever the residual grows, and the best iterate is returned, so
    the result is never worse than plain inversion.
    """
    a_back, b_back = step_coefficients(alpha_bar(backbone, t), alpha_bar(backbone, t_prev))
    scale = x_prev.flatten(1).norm(dim=1).clamp_min(1e-12)

    def residual(z: torch.Tensor, e: torch.Tensor) -> float:
        return float(((a_back * z + b_back * e - x_prev).flatten(1).norm(dim=1) / scale).max())

    best, best_eps = x, backbone.eps(x, t, cond)
    best_res = residual(best, best_eps)
    relax, k = 1.0, 1
    while best_res > tol and k < max_iter:
        target = (x_prev - b_back * best_eps) / a_back
        cand = best + relax * (target - best)
        cand_eps = backbone.eps(cand, t, cond)
        k += 1
        cand_res = residual(cand, cand_eps)
        if cand_res < best_res:
            best, best_eps, best_res = cand, cand_eps, cand_res
            relax = min(1.0, 2 * relax)
        else:
            relax *= 0.5
    return best, best_res, k


@torch.no_grad()
def invert(backbone: Backbone, x0: torch.Tensor, t: int = 700, num_steps: int = 50,
           cond: Conditioning | None = None, *, exact: bool = False, tol: float = 1e-5,
           max_iter: int = 50, spacing: str = "leading", offset: int = 0,
           progress: bool = False) -> Trajectory:
    """DDIM inversion of a clean state x0 up to grid timestep t (plain, or exact fixed-point)."""
    _check_start(backbone, x0, "x0")
    if tol <= 0 or max_iter < 1:
        raise InputError(f"tol must be > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    grid = grid_up_to(backbone, t, num_steps, spacing, offset)
    x = x0
    times: list[int | None] = [None]
    states = [x0]
    residuals: list[float] = []
    iters: list[int] = []
    prev: int | None = None
    for t_next in tqdm(grid, desc="invert", disable=not progress, leave=False):
        eps = backbone.eps(x, t_next, cond)
        x_new = ddim_step(backbone, x, prev, t_next, eps)
        if exact:
            x_new, res, k = _solve_inversion_step(backbone, x, x_new, prev, t_next, cond, tol,
                                                  max_iter)
            residuals.append(res)
            iters.append(k)
        x, prev = x_new, t_next
        times.append(t_next)
        states.append(x)
    settings = dict(t=t, num_steps=num_steps, exact=exact, tol=tol, max_iter=max_iter,
                    spacing=spacing, offset=offset)
    return Trajectory(times, states, "inversion", settings, residuals, iters)


@torch.no_grad()
def generate(backbone: Backbone, xt: torch.Tensor, t: int = 700, num_steps: int = 50,
             cond: Conditioning | None = None, *, eta: float = 0.0,
             generator: torch.Generator | None = None, clip_x0: bool = False,
             spacing: str = "leading", offset: int = 0, progress: bool = False) -> Trajectory:
    """DDIM generation from x_t at grid timestep t down to the clean level.

    ``eta`` > 0 adds DDIM's stochastic term (needs an explicit ``generator``: no hidden RNG).
    ``clip_x0`` clamps x̂0 to [-1, 1] at every step and recomputes ε from the clamped x̂0, so the
    step stays a DDIM step of a consistent (x̂0, ε) pair. Pixel DDPMs are sampled this way
    (their schedulers set clip_sample); without it an imperfect model's x̂0 overshoots at high
    noise and samples saturate. Leave it off for inversion round trips, curves and edits: it
    makes generation non-invertible.
    """
    _check_start(backbone, xt, "xt")
    if eta < 0:
        raise InputError(f"eta must be >= 0, got {eta}")
    if eta > 0 and generator is None:
        raise InputError("eta > 0 draws noise: pass generator=torch.Generator().manual_seed(N)")
    grid = grid_up_to(backbone, t, num_steps, spacing, offset)
    levels: list[int | None] = [None, *grid]
    x = xt
    times: list[int | None] = [t]
    states = [xt]
    for i in tqdm(range(len(grid), 0, -1), desc="generate", disable=not progress, leave=False):
        t_from, t_to = levels[i], levels[i - 1]
        eps = backbone.eps(x, t_from, cond)
        if clip_x0:
            ab_t = alpha_bar(backbone, t_from)
            x0_pred = ((x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5).clamp(-1, 1)
            eps = (x - ab_t**0.5 * x0_pred) / (1 - ab_t) ** 0.5
        if eta == 0:
            x = ddim_step(backbone, x, t_from, t_to, eps)
        else:
            ab_t, ab_prev = alpha_bar(backbone, t_from), alpha_bar(backbone, t_to)
            sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
            x0_pred = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                device=generator.device).to(x.device)
            x = ab_prev**0.5 * x0_pred + (1 - ab_prev - sigma**2) ** 0.5 * eps + sigma * noise
        times.append(t_to)
        states.append(x)
    settings = dict(t=t, num_steps=num_steps, eta=eta, clip_x0=clip_x0, spacing=spacing,
                    offset=offset)
    return Trajectory(times, states, "generation", settings)


def reconstruct(backbone: Backbone, x0: torch.Tensor, t: int = 700, num_steps: int = 50,
                cond: Conditioning | None = None, *, exact: bool = False,
                progress: bool = False, **kwargs: Any) -> tuple[Trajectory, Trajectory]:
    """Invert then regenerate on the same grid: (inversion, generation)."""
    inv = invert(backbone, x0, t, num_steps, cond, exact=exact, progress=progress, **kwargs)
    gen_kw = {k: kwargs[k] for k in ("spacing", "offset") if k in kwargs}
    gen = generate(backbone, inv.last, t, num_steps, cond, progress=progress, **gen_kw)
    return inv, gen


@torch.no_grad()
def walk(backbone: Backbone, x: torch.Tensor, t_from: int, t_to: int, num_steps: int = 50,
         cond: Conditioning | None = None, *, spacing: str = "leading",
         offset: int = 0) -> dict[int, torch.Tensor]:
    """Deterministic DDIM from grid level ``t_from`` to ``t_to`` in either direction.

    Upward steps are inversion steps (ε at the state they start from, with the timestep they go
    to, as ``invert``); downward steps are generation steps (as ``generate``). Returns every
    grid state visited, ``{t: state}``, both ends included — the path 𝒳(X_t) through a noisy
    state that curve matching reads its X_{t_k} from.
    """
    _check_start(backbone, x, "x")
    grid = ddim_grid(backbone.num_train_timesteps, num_steps, spacing, offset)
    for name, t in (("t_from", t_from), ("t_to", t_to)):
        if isinstance(t, bool) or not isinstance(t, int) or t not in grid:
            raise InputError(f"{name}={t!r} is not on the {num_steps}-step {spacing} grid")
    i, j = grid.index(t_from), grid.index(t_to)
    out = {t_from: x}
    step = 1 if j > i else -1
    for k in range(i, j, step):
        t_cur, t_next = grid[k], grid[k + step]
        eps = backbone.eps(x, t_next if step > 0 else t_cur, cond)
        x = ddim_step(backbone, x, t_cur, t_next, eps)
        out[t_next] = x
    return out
