"""The one place that steps through time: generation (down the grid) and inversion (up it).

    inversion:  clean --ε(x, t_0)--> X_{t_0} --ε(X_{t_0}, t_1)--> X_{t_1} ... --> X_{t_stop}
    generation: X_{t_stop} --ε(X_{t_stop}, t_stop)--> ... X_{t_0} --ε(X_{t_0}, t_0)--> clean

Inversion steps use ε evaluated at the state they start from with the timestep they go to, as
diffusers' ``DDIMInverseScheduler`` does, which generation only approximately undoes; the
``exact`` inversion mode solves, per step, for the X_{t_i} that the generation step maps back
onto X_{t_{i-1}} by fixed-point iteration and reports every step's residual.

Methods customise :func:`sample` with two hooks instead of writing their own loop:

* ``eps_fn(x, t)`` — the ε of a step (default: the model's, with classifier-free guidance when
  a :class:`Guidance` is given). It may return a pair ``(ε_x0, ε_dir)`` for an asymmetric step
  (RBE's h-space edit).
* ``on_step(step)`` — called after every step with a :class:`Step`; what it returns replaces the
  state (PIXELS pins the noised source, RePaint merges the known region and resamples, curve
  matching's blended decode pastes the original path). ``before_step(t, x)`` does the same
  before the ε call.

Flow-matching models (``backbone.prediction_type == "flow"``, grids whose rule is a
``FlowRule``) run through the same loops: ``eps_fn`` then returns the model's *velocity* (what
the flow step consumes; guidance combines velocities as it combines ε), a step is
:func:`~diffgeo.sampling.flow.flow_step` between the levels' sigmas, and exact inversion solves
the same fixed point with the flow step's coefficients (x_prev = x + (σ_prev − σ)·v(x)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.errors import InputError
from diffgeo.sampling.ddim import clip_eps, ddim_step, predict_x0, step_coefficients
from diffgeo.sampling.flow import flow_step, x0_from_velocity
from diffgeo.sampling.grid import Grid

EpsOut = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
EpsFn = Callable[[torch.Tensor, int], EpsOut]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance ε = ε(∅) + scale·(ε(c) − ε(∅)); ``uncond`` is the empty
    prompt's conditioning (``backbone.condition("")``)."""

    scale: float
    uncond: Conditioning

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) \
                or not self.scale >= 1:
            raise InputError(f"guidance_scale must be a number >= 1, got {self.scale!r}")
        if not isinstance(self.uncond, Conditioning):
            raise InputError("guidance needs the empty prompt's conditioning (uncond)")


def eps_model(backbone: Backbone, cond: Conditioning | None,
              guidance: Guidance | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """ε(x, t) of the model under ``cond``, guided when ``guidance`` says so (the velocity on
    a flow-matching model: the quantity its step consumes)."""
    pred = backbone.velocity if backbone.prediction_type == "flow" else backbone.eps  # type: ignore[attr-defined]
    if guidance is None or guidance.scale == 1:
        return lambda x, t: pred(x, t, cond)
    if cond is None:
        raise InputError("guidance_scale > 1 needs a conditional model and a prompt (cond)")

    def guided(x: torch.Tensor, t: int) -> torch.Tensor:
        e_u = pred(x, t, guidance.uncond)
        e_c = pred(x, t, cond)
        return e_u + guidance.scale * (e_c - e_u)

    return guided


def predict_clean(backbone: Backbone, x: torch.Tensor, t: Any, grid: Grid,
                  cond: Conditioning | None = None) -> torch.Tensor:
    """The model's x̂0 at level t: (x − √(1 − ᾱ)·ε)/√ᾱ, or x − σ·v on a flow grid (defined
    at σ = 1 too)."""
    if grid.flow:
        return x0_from_velocity(x, backbone.velocity(x, t, cond),  # type: ignore[attr-defined]
                                grid.sigma(t))
    return predict_x0(x, backbone.eps(x, t, cond), grid.alpha_bar(t))


@dataclass
class Trajectory:
    """States along one path, ordered in the direction it was computed.

    ``timesteps[i]`` is the level of ``states[i]``; ``None`` is the clean level. ``grid`` is the
    grid the path ran on (its ``clean_alpha_bar`` is the clean level's alpha_bar).
    """

    timesteps: list[int | None]
    states: list[torch.Tensor]
    direction: str  # "inversion" | "generation"
    grid: Grid
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

    def noisy_timesteps(self) -> list[int]:
        """The path's timesteps without the clean level, in path order."""
        return [t for t in self.timesteps if t is not None]


@dataclass
class Step:
    """What an ``on_step`` hook sees: the step t_from -> t_to (``None`` = clean) number ``i``
    (0 = the first executed), the state it started from, the state it reached, and ``redo``,
    which runs the same step again from another state (RePaint's resampling)."""

    i: int
    t_from: int
    t_to: int | None
    x_from: torch.Tensor
    x_to: torch.Tensor
    redo: Callable[[torch.Tensor], torch.Tensor]


def check_start(backbone: Backbone, x: torch.Tensor, name: str) -> None:
    backbone.check_state(x, name)
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")


def _check_eta(eta: float | Callable[[int], float], generator: torch.Generator | None) -> None:
    if callable(eta):
        return
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not eta >= 0:
        raise InputError(f"eta must be a number >= 0, got {eta!r}")
    if eta > 0 and generator is None:
        raise InputError("eta > 0 draws noise: pass generator=torch.Generator().manual_seed(N)")


@torch.no_grad()
def sample(backbone: Backbone, x: torch.Tensor, grid: Grid, *,
           cond: Conditioning | None = None, guidance: Guidance | None = None,
           eps_fn: EpsFn | None = None,
           on_step: Callable[[Step], torch.Tensor] | None = None,
           before_step: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
           eta: float | Callable[[int], float] = 0.0, generator: torch.Generator | None = None,
           clip_x0: bool = False, stop: int | None = None, record: bool = True,
           progress: bool = False, desc: str = "generate") -> Trajectory:
    """Generate from ``x`` at the top of ``grid`` down to the clean level (or to grid timestep
    ``stop``).

    ``eta`` (a number, or a function of the step's starting timestep) > 0 adds DDIM's stochastic
    term, drawn from ``generator`` in step order. ``clip_x0`` clamps x̂0 to [-1, 1] at every step
    and recomputes ε from it; pixel DDPMs are sampled this way (without it an imperfect model's
    x̂0 overshoots at high noise), but it makes generation non-invertible: leave it off for
    inversion round trips, curves and edits. ``record=False`` keeps only the first and last
    states.
    """
    check_start(backbone, x, "x")
    _check_eta(eta, generator)
    if grid.flow and (clip_x0 or (not callable(eta) and eta != 0)):
        raise InputError("eta and clip_x0 are DDIM options; the flow-matching step is "
                         "deterministic Euler")
    eps_of = eps_fn or eps_model(backbone, cond, guidance)
    levels = grid.levels() if stop is None else [
        t for t in grid.timesteps if t >= grid.check(stop, "stop")]
    times: list[int | None] = [grid.top]
    states = [x]

    def one_step(state: torch.Tensor, t_from: int, t_to: int | None) -> torch.Tensor:
        out = eps_of(state, t_from)
        eps, eps_x0 = (out[1], out[0]) if isinstance(out, tuple) else (out, None)
        if grid.flow:
            if callable(eta) and eta(t_from) != 0:
                raise InputError("eta > 0 is a DDIM option; the flow-matching step is "
                                 "deterministic Euler")
            return flow_step(state, eps, grid.sigma(t_from), grid.sigma(t_to), v_x0=eps_x0)
        ab_from, ab_to = grid.alpha_bar(t_from), grid.alpha_bar(t_to)
        if clip_x0:
            eps = clip_eps(state, eps, ab_from)
        step_eta = eta(t_from) if callable(eta) else eta
        noise = None
        if step_eta > 0:
            if generator is None:
                raise InputError("eta > 0 draws noise: pass a torch.Generator")
            noise = torch.randn(state.shape, generator=generator, dtype=state.dtype,
                                device=generator.device).to(state.device)
        return ddim_step(state, eps, ab_from, ab_to, eps_x0=eps_x0, eta=step_eta, noise=noise)

    for n, i in enumerate(tqdm(range(len(levels) - 1, 0, -1), desc=desc,
                               disable=not progress, leave=False)):
        t_from, t_to = levels[i], levels[i - 1]
        assert t_from is not None
        if before_step is not None:
            x = before_step(n, t_from, x)
        x_new = one_step(x, t_from, t_to)
        if on_step is not None:
            x_new = on_step(Step(n, t_from, t_to, x, x_new,
                                 lambda s, a=t_from, b=t_to: one_step(s, a, b)))
        x = x_new
        if record or i == 1:
            times.append(t_to)
            states.append(x)
    return Trajectory(times, states, "generation", grid,
                      dict(t=grid.top, eta=eta if not callable(eta) else "per step",
                           clip_x0=clip_x0, grid=grid.to_dict()))


def _solve_inversion_step(eps_of: Callable[[torch.Tensor, int], torch.Tensor],
                          x_prev: torch.Tensor, x: torch.Tensor, a_back: float, b_back: float,
                          t: int, tol: float, max_iter: int) -> tuple[torch.Tensor, float, int]:
    """Find x with gen_step(x) = a_back·x + b_back·ε(x, t) = x_prev by damped fixed-point
    iteration (DDIM: Eq. 8's A, B of the step back; flow: 1 and σ_prev − σ, ε the velocity).

    The plain iteration x <- (x_prev - B·ε(x, t)) / A contracts when |B/A|·‖Dε‖ < 1, which holds
    for trained models and small steps but not always (large steps, untrained networks). The
    relaxation factor is halved whenever the residual grows, and the best iterate is returned, so
    the result is never worse than plain inversion.
    """
    scale = x_prev.flatten(1).norm(dim=1).clamp_min(1e-12)

    def residual(z: torch.Tensor, e: torch.Tensor) -> float:
        return float(((a_back * z + b_back * e - x_prev).flatten(1).norm(dim=1) / scale).max())

    best, best_eps = x, eps_of(x, t)
    best_res = residual(best, best_eps)
    relax, k = 1.0, 1
    while best_res > tol and k < max_iter:
        target = (x_prev - b_back * best_eps) / a_back
        cand = best + relax * (target - best)
        cand_eps = eps_of(cand, t)
        k += 1
        cand_res = residual(cand, cand_eps)
        if cand_res < best_res:
            best, best_eps, best_res = cand, cand_eps, cand_res
            relax = min(1.0, 2 * relax)
        else:
            relax *= 0.5
    return best, best_res, k


@torch.no_grad()
def ascend(backbone: Backbone, x: torch.Tensor, grid: Grid, *, start: int | None = None,
           cond: Conditioning | None = None, guidance: Guidance | None = None,
           exact: bool = False, tol: float = 1e-5, max_iter: int = 50,
           progress: bool = False, desc: str = "invert") -> Trajectory:
    """Inversion steps from level ``start`` (None = clean) up to the top of ``grid``."""
    check_start(backbone, x, "x")
    if exact and (isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0
                  or isinstance(max_iter, bool) or not isinstance(max_iter, int)
                  or max_iter < 1):
        raise InputError(f"tol must be > 0 and max_iter an integer >= 1, got tol={tol!r}, "
                         f"max_iter={max_iter!r}")
    eps_of = eps_model(backbone, cond, guidance)
    above = [t for t in grid.timesteps if start is None or t > start]
    times: list[int | None] = [start]
    states = [x]
    residuals: list[float] = []
    iters: list[int] = []
    prev = start
    for t_next in tqdm(above, desc=desc, disable=not progress, leave=False):
        if grid.flow:
            s_prev, s = grid.sigma(prev), grid.sigma(t_next)
            x_new = flow_step(x, eps_of(x, t_next), s_prev, s)
            back = (1.0, s_prev - s)
        else:
            ab_prev, ab = grid.alpha_bar(prev), grid.alpha_bar(t_next)
            x_new = ddim_step(x, eps_of(x, t_next), ab_prev, ab)
            back = step_coefficients(ab, ab_prev)
        if exact:
            x_new, res, k = _solve_inversion_step(eps_of, x, x_new, *back, t_next, tol,
                                                  max_iter)
            residuals.append(res)
            iters.append(k)
        x, prev = x_new, t_next
        times.append(t_next)
        states.append(x)
    settings = dict(t=grid.top, exact=exact, tol=tol, max_iter=max_iter, grid=grid.to_dict())
    return Trajectory(times, states, "inversion", grid, settings, residuals, iters)


def invert(backbone: Backbone, x0: torch.Tensor, t: int = 700, grid: Grid | int | None = None,
           cond: Conditioning | None = None, *, exact: bool = False, tol: float = 1e-5,
           max_iter: int = 50, guidance: Guidance | None = None,
           progress: bool = False) -> Trajectory:
    """DDIM inversion of a clean state x0 up to grid timestep t (plain, or exact fixed-point).

    ``grid``: a :class:`Grid`, or a number of steps on the model's own grid (default 50).
    """
    check_start(backbone, x0, "x0")
    g = Grid.resolve(backbone, grid).up_to(t)
    return ascend(backbone, x0, g, cond=cond, guidance=guidance, exact=exact, tol=tol,
                  max_iter=max_iter, progress=progress)


def generate(backbone: Backbone, xt: torch.Tensor, t: int = 700,
             grid: Grid | int | None = None, cond: Conditioning | None = None, *,
             eta: float = 0.0, generator: torch.Generator | None = None, clip_x0: bool = False,
             guidance: Guidance | None = None, progress: bool = False) -> Trajectory:
    """DDIM generation from x_t at grid timestep t down to the clean level (see :func:`sample`)."""
    check_start(backbone, xt, "xt")
    g = Grid.resolve(backbone, grid).up_to(t)
    return sample(backbone, xt, g, cond=cond, guidance=guidance, eta=eta, generator=generator,
                  clip_x0=clip_x0, progress=progress)


def reconstruct(backbone: Backbone, x0: torch.Tensor, t: int = 700,
                grid: Grid | int | None = None, cond: Conditioning | None = None, *,
                exact: bool = False, progress: bool = False,
                **kwargs: Any) -> tuple[Trajectory, Trajectory]:
    """Invert then regenerate on the same grid: (inversion, generation)."""
    inv = invert(backbone, x0, t, grid, cond, exact=exact, progress=progress, **kwargs)
    gen = generate(backbone, inv.last, t, inv.grid, cond, progress=progress)
    return inv, gen


def walk(backbone: Backbone, x: torch.Tensor, t_from: int, t_to: int,
         grid: Grid | int | None = None,
         cond: Conditioning | None = None) -> dict[int, torch.Tensor]:
    """Deterministic DDIM from grid level ``t_from`` to ``t_to`` in either direction.

    Upward steps are inversion steps, downward steps generation steps (as :func:`invert` and
    :func:`generate`). Returns every grid state visited, ``{t: state}``, both ends included —
    the path 𝒳(X_t) through a noisy state that curve matching reads its X_{t_k} from.
    """
    g = Grid.resolve(backbone, grid)
    g.check(t_from, "t_from")
    g.check(t_to, "t_to")
    if t_to >= t_from:
        path = ascend(backbone, x, g.up_to(t_to), start=t_from, cond=cond)
    else:
        path = sample(backbone, x, g.up_to(t_from), cond=cond, stop=t_to)
    return dict(zip(path.timesteps, path.states, strict=True))  # type: ignore[arg-type]
