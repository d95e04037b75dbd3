"""The timesteps of a run, built once from the model's scheduler config.

A :class:`Grid` is what diffusers' ``DDIMScheduler.set_timesteps`` computes — the same spacing
(``leading``, ``trailing``, ``linspace``), ``steps_offset`` and clean-end alpha_bar
(``set_alpha_to_one``) — held as an ascending tuple of integer training timesteps. Generation
walks it downwards and ends at the clean level (``None``, alpha_bar = :attr:`Grid.clean_alpha_bar`);
inversion walks the same grid upwards from there, so the two are the same path reversed.

Every step goes from one grid point to the next. diffusers' DDIM steps to ``t - T // N`` instead,
which is the next grid point for ``leading`` grids and for ``trailing`` grids whose N divides T
(every Stable Diffusion and pixel-DDPM configuration); for ``linspace`` and other ``trailing``
grids diffusers' step and its own grid disagree, and diffgeo follows the grid.

Flow-matching models (SD3, FLUX) get a Grid whose rule is a
:class:`~diffgeo.sampling.flow.FlowRule`: its levels are the scheduler's model times τ = σ·T
(floats, see :mod:`diffgeo.sampling.flow`), ``sigma(t)`` gives σ, and ``alpha_bar`` is refused
(a flow has no ᾱ; a method that needs one must step with ``sigma`` instead of silently using
DDPM coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from diffgeo.backbones.base import Backbone
from diffgeo.errors import InputError
from diffgeo.sampling.ddim import noised as ddpm_noised
from diffgeo.sampling.ddim import renoised as ddpm_renoised
from diffgeo.sampling.ddim import step_coefficients as ddpm_step_coefficients
from diffgeo.sampling.flow import FlowRule, flow_noised, flow_timesteps, sigma_of
from diffgeo.schedule import SPACINGS, GridRule

DEFAULT_STEPS = 50


def grid_timesteps(num_train_timesteps: int, num_steps: int, rule: GridRule) -> list[int]:
    """The ascending timesteps diffusers' DDIM schedulers use for ``num_steps`` steps."""
    T = num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) \
            or not 1 <= num_steps <= T:
        raise InputError(f"steps must be an integer in 1..{T}, got {num_steps!r}")
    n = int(num_steps)
    if rule.spacing == "leading":
        ratio = T // n
        grid = [i * ratio + rule.steps_offset for i in range(n)]
    elif rule.spacing == "trailing":
        # diffusers' own expression: rounding halves the same way keeps the grids identical.
        grid = sorted(int(v) - 1 for v in np.round(np.arange(T, 0, -T / n)[:n]))
    else:
        grid = sorted(int(v) for v in np.linspace(0, T - 1, n).round())
    if grid[0] < 0 or grid[-1] >= T:
        raise InputError(f"steps_offset {rule.steps_offset} moves the {n}-step grid outside "
                         f"0..{T - 1}")
    if len(set(grid)) != n:
        raise InputError(f"{n} steps do not fit {T} training timesteps with {rule.spacing} "
                         "spacing (repeated timesteps)")
    return grid


def clean_alpha_bar(rule: GridRule, alphas_cumprod: torch.Tensor) -> float:
    """alpha_bar of the clean end of a grid: 1, or alpha_bar at t = 0 (``set_alpha_to_one``
    False, as Stable Diffusion configs say)."""
    return 1.0 if rule.set_alpha_to_one else float(alphas_cumprod[0])


def alpha_bar(backbone: Backbone, t: int | None) -> float:
    """alpha_bar at training timestep t under the model's own grid rule; None = clean end."""
    if isinstance(backbone.grid_rule, FlowRule):
        raise InputError("alpha_bar is a DDPM quantity: this method does not support "
                         "flow-matching models yet (their grid levels carry sigma)")
    if t is None:
        return clean_alpha_bar(backbone.grid_rule, backbone.alphas_cumprod)
    return float(backbone.alphas_cumprod[t])


def signal_noise(backbone: Backbone, t: float | None) -> tuple[float, float]:
    """(a, b) with X_t = a·x0 + b·ε at level t: (√ᾱ, √(1 − ᾱ)) on DDPM models, (1 − σ, σ)
    on flow-matching ones (σ = t / T; None = clean)."""
    if isinstance(backbone.grid_rule, FlowRule):
        s = sigma_of(t, backbone.num_train_timesteps)
        return 1 - s, s
    ab = alpha_bar(backbone, t)  # type: ignore[arg-type]
    return ab**0.5, (1 - ab) ** 0.5


def step_coefficients_at(backbone: Backbone, t_from: float, t_to: float | None
                         ) -> tuple[float, float]:
    """A, B with x_to = A·x + B·p for the deterministic step t_from -> t_to, where p is what
    the step consumes (:func:`step_output`): Eq. 8's A(t), B(t) with p = ε on DDPM models,
    A = 1, B = σ_to − σ_from with p = v on flow-matching ones."""
    if isinstance(backbone.grid_rule, FlowRule):
        T = backbone.num_train_timesteps
        return 1.0, sigma_of(t_to, T) - sigma_of(t_from, T)
    return ddpm_step_coefficients(alpha_bar(backbone, t_from),  # type: ignore[arg-type]
                                  alpha_bar(backbone, t_to))


def step_output(backbone: Backbone) -> str:
    """The network output a step consumes, as ``jacobian`` names it: "eps" or "velocity"."""
    return "velocity" if isinstance(backbone.grid_rule, FlowRule) else "eps"


@dataclass(frozen=True)
class Grid:
    """The integer timesteps of one run (ascending), and alpha_bar at each of them.

    ``num_steps`` is the size of the full grid the run was cut from (a grid truncated with
    :meth:`up_to` or :meth:`lowest` keeps it, as diffusers' img2img keeps its scheduler's).
    """

    timesteps: tuple[int, ...] | tuple[float, ...]
    num_steps: int
    rule: GridRule | FlowRule
    alphas_cumprod: torch.Tensor = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise InputError("a grid needs at least one timestep")
        if list(self.timesteps) != sorted(set(self.timesteps)):
            raise InputError("grid timesteps must be strictly ascending")

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, backbone: Backbone, num_steps: int = DEFAULT_STEPS, *,
                  spacing: str | None = None, steps_offset: int | None = None,
                  set_alpha_to_one: bool | None = None) -> Grid:
        """The model's own grid with ``num_steps`` steps; keywords override its scheduler."""
        base = backbone.grid_rule
        if isinstance(base, FlowRule):
            if spacing is not None or steps_offset is not None or set_alpha_to_one is not None:
                raise InputError("spacing, steps_offset and set_alpha_to_one are DDPM grid "
                                 "settings; a flow model's grid comes from its sigmas")
            return cls(tuple(flow_timesteps(base, num_steps)), int(num_steps), base,
                       backbone.alphas_cumprod)
        rule = GridRule(spacing=base.spacing if spacing is None else spacing,
                        steps_offset=base.steps_offset if steps_offset is None else steps_offset,
                        set_alpha_to_one=(base.set_alpha_to_one if set_alpha_to_one is None
                                          else set_alpha_to_one))
        ts = grid_timesteps(backbone.num_train_timesteps, num_steps, rule)
        return cls(tuple(ts), int(num_steps), rule, backbone.alphas_cumprod)

    @classmethod
    def resolve(cls, backbone: Backbone, grid: Grid | int | None) -> Grid:
        """A Grid from what a method was given: a Grid (checked against the model), a number
        of steps on the model's own grid, or None (the default number of steps)."""
        if grid is None:
            return cls.for_model(backbone)
        if isinstance(grid, Grid):
            if len(grid.alphas_cumprod) != backbone.num_train_timesteps or not torch.equal(
                    grid.alphas_cumprod, backbone.alphas_cumprod):
                raise InputError("grid was built for another model's noise schedule")
            if (grid.flow or isinstance(backbone.grid_rule, FlowRule)) \
                    and grid.rule != backbone.grid_rule:
                raise InputError("grid was built for another model's flow schedule or image "
                                 "size")
            return grid
        return cls.for_model(backbone, grid)

    @classmethod
    def from_dict(cls, backbone: Backbone, data: dict[str, Any]) -> Grid:
        """The grid :meth:`to_dict` recorded (settings.json), rebuilt for ``backbone``."""
        try:
            if "flow" in data["rule"]:
                frule = FlowRule.from_dict(data["rule"])
                full = cls(tuple(flow_timesteps(frule, int(data["num_steps"]))),
                           int(data["num_steps"]), frule, backbone.alphas_cumprod)
                ts = tuple(float(t) for t in data["timesteps"])
                if frule != backbone.grid_rule:
                    raise InputError("recorded flow grid was built for another model's "
                                     "scheduler or image size")
                if not set(ts) <= set(full.timesteps):
                    raise InputError("recorded grid timesteps are not on this model's grid")
                return replace(full, timesteps=ts)
            rule = GridRule(**data["rule"])
            full = cls(tuple(grid_timesteps(backbone.num_train_timesteps, int(data["num_steps"]),
                                            rule)), int(data["num_steps"]), rule,
                       backbone.alphas_cumprod)
            ts = tuple(int(t) for t in data["timesteps"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a recorded grid: {data!r} ({e})") from None
        if not set(ts) <= set(full.timesteps):
            raise InputError("recorded grid timesteps are not on this model's grid")
        return replace(full, timesteps=ts)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.timesteps)

    def __iter__(self):
        return iter(self.timesteps)

    def __contains__(self, t: object) -> bool:
        return t in self.timesteps

    @property
    def top(self) -> int:
        return self.timesteps[-1]

    @property
    def bottom(self) -> int:
        return self.timesteps[0]

    @property
    def flow(self) -> bool:
        """Whether this is a flow-matching grid (levels carry σ; see the module docstring)."""
        return isinstance(self.rule, FlowRule)

    @property
    def clean_alpha_bar(self) -> float:
        """alpha_bar of the clean end: 1, or alpha_bar at t = 0 (``set_alpha_to_one=False``)."""
        self._ddpm_only("clean_alpha_bar")
        return clean_alpha_bar(self.rule, self.alphas_cumprod)  # type: ignore[arg-type]

    def alpha_bar(self, t: int | None) -> float:
        """alpha_bar at grid timestep t (float64 from the schedule); None is the clean end."""
        self._ddpm_only("alpha_bar")
        return self.clean_alpha_bar if t is None else float(self.alphas_cumprod[t])

    def sigma(self, t: float | None) -> float:
        """σ of a flow grid level (None = clean, σ = 0)."""
        if not self.flow:
            raise InputError("sigma() is defined on flow-matching grids; this grid is DDPM's")
        return sigma_of(t, self.rule.num_train_timesteps)  # type: ignore[union-attr]

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """The forward process at level t: √ᾱ·x0 + √(1 − ᾱ)·noise, or (1 − σ)·x0 + σ·noise."""
        if self.flow:
            return flow_noised(x0, noise, self.sigma(t))
        return ddpm_noised(x0, noise, self.alpha_bar(t))  # type: ignore[arg-type]

    def renoised(self, x_to: torch.Tensor, noise: torch.Tensor, t_from: float,
                 t_to: float | None) -> torch.Tensor:
        """q(x_from | x_to) for the noisier level t_from: back up one level with fresh noise.
        Flow: x_from = r·x_to + sqrt(σ_from² − r²·σ_to²)·noise, r = (1 − σ_from)/(1 − σ_to)
        (the marginal at σ_from stays (1 − σ)·x0 + σ·ε)."""
        if not self.flow:
            return ddpm_renoised(x_to, noise, self.alpha_bar(t_from),  # type: ignore[arg-type]
                                 self.alpha_bar(t_to))  # type: ignore[arg-type]
        s_from, s_to = self.sigma(t_from), self.sigma(t_to)
        r = (1 - s_from) / (1 - s_to)
        return r * x_to + max(s_from**2 - (r * s_to) ** 2, 0.0) ** 0.5 * noise

    def _ddpm_only(self, what: str) -> None:
        if self.flow:
            raise InputError(f"{what} is a DDPM quantity: this method does not support "
                             "flow-matching models yet (their grid levels carry sigma)")

    def levels(self) -> list[int | None]:
        """The clean level then every timestep: ``[None, t_0, t_1, ...]``."""
        return [None, *self.timesteps]

    def index(self, t: int) -> int:
        self.check(t)
        return self.timesteps.index(t)

    def check(self, t: Any, name: str = "t") -> int:
        """t itself when it is a timestep of this grid; a clear error naming the nearest ones.

        On a flow grid the levels are floats (σ·T) nobody types: a number within the grid's
        span names the level nearest to it (ties to the lower), and that level is returned;
        command lines and paper defaults (t = 700) reach the grid this way.
        """
        if self.flow:
            if isinstance(t, bool) or not isinstance(t, int | float | np.integer | np.floating):
                raise InputError(f"{name} must be a number (a model time sigma*T), got {t!r}")
            T = self.rule.num_train_timesteps  # type: ignore[union-attr]
            if not 0 <= float(t) <= T:
                raise InputError(f"{name}={t} is outside the model times 0..{T} of the "
                                 f"{self.describe()}")
            return self.nearest(t)  # type: ignore[return-value]
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise InputError(f"{name} must be an integer timestep, got {t!r}")
        if int(t) not in self.timesteps:
            near = sorted(sorted(self.timesteps, key=lambda g: abs(g - int(t)))[:2])
            raise InputError(f"{name}={int(t)} is not on the {self.describe()}; nearest grid "
                             f"timesteps: {near}")
        return int(t)

    def nearest(self, t: int) -> int:
        """The grid timestep nearest to ``t`` (the lower one on a tie): where a method's
        default from a paper (t = 700 on a 0..999 grid) lands on this model's grid."""
        x = float(t) if self.flow else int(t)
        return min(self.timesteps, key=lambda g: (abs(g - x), g))

    def describe(self) -> str:
        if self.flow:
            return (f"{self.num_steps}-step flow-matching grid (sigma "
                    f"{self.sigma(self.timesteps[0]):.4g}..{self.sigma(self.timesteps[-1]):.4g})")
        step = self.timesteps[1] - self.timesteps[0] if len(self) > 1 else 0
        return (f"{self.num_steps}-step {self.rule.spacing} grid (offset "
                f"{self.rule.steps_offset}, step {step})")

    # ------------------------------------------------------------------ cutting
    def up_to(self, t: int) -> Grid:
        """The grid points 0..t (t must be on the grid: timesteps are never rounded)."""
        t = self.check(t)
        return replace(self, timesteps=tuple(g for g in self.timesteps if g <= t))

    def lowest(self, n: int) -> Grid:
        """The ``n`` lowest grid points (img2img and PIXELS execute these)."""
        if not 1 <= n <= len(self):
            raise InputError(f"cannot take {n} steps of a {len(self)}-step grid")
        return replace(self, timesteps=self.timesteps[:n])

    def to_dict(self) -> dict[str, Any]:
        if self.flow:
            return {"timesteps": list(self.timesteps), "num_steps": self.num_steps,
                    "rule": self.rule.to_dict(),  # type: ignore[union-attr]
                    "sigmas": [self.sigma(t) for t in self.timesteps]}
        return {"timesteps": list(self.timesteps), "num_steps": self.num_steps,
                "rule": {"spacing": self.rule.spacing, "steps_offset": self.rule.steps_offset,
                         "set_alpha_to_one": self.rule.set_alpha_to_one},
                "clean_alpha_bar": self.clean_alpha_bar}


__all__ = ["DEFAULT_STEPS", "SPACINGS", "Grid", "GridRule", "alpha_bar", "clean_alpha_bar",
           "grid_timesteps", "signal_noise", "step_coefficients_at", "step_output"]
