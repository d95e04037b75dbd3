"""RBE's settings: the paper's defaults, the discovery and edit configs, and the input checks
every RBE entry point shares."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from diffgeo.backbones.base import Backbone
from diffgeo.backbones.functional import FunctionalBackbone
from diffgeo.errors import InputError, check_int
from diffgeo.sampling.flow import check_time
from diffgeo.tangent import PowerIterationConfig

DEFAULT_T = 500          # RBE: discovery / edit timestep
DEFAULT_STEPS = 40       # RBE: DDIM steps over T for inversion and generation
DEFAULT_K = 3            # RBE: directions per region
DEFAULT_STRENGTH = 30.0  # RBE: edit scale ±30 on unit h-vectors
PROJECTIONS = ("leading", "subspace", "none")
MODES = ("x0", "replace")
MASK_RULE = ("image mask (1 = region) area-averaged onto the state grid "
             "(F.interpolate mode='area'), broadcast over channels")

_POWER_FIELDS = tuple(f.name for f in dataclasses.fields(PowerIterationConfig))


@dataclass(frozen=True)
class RBEConfig(PowerIterationConfig):
    """How directions are found: the power iteration's options (inherited from
    :class:`~diffgeo.tangent.PowerIterationConfig`, whose docstring states what ``converged``
    and ``error_bound`` guarantee; the paper's k = 3 and at most 50 passes, one oversampling
    vector to measure the gap) and RBE's own.

    ``t``: the discovery timestep, on the run's grid; None takes the grid point nearest the
    paper's 500 (501 on a Stable Diffusion config). ``k_unmasked``: how many unmasked vectors
    to compute (default k) — ``"leading"`` uses only the first, but iterating a block of k_u
    converges faster than a single vector. ``project_against``: the Eq. 14 projection,
    ``"leading"`` (the paper), ``"subspace"`` (the top k_u), ``"none"``. ``chunk``: products per
    network call.
    """

    t: int | None = None
    k_unmasked: int | None = None
    project_against: str = "leading"
    chunk: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        put = object.__setattr__
        if self.t is not None:
            put(self, "t", check_time(self.t, "t"))
        if self.k_unmasked is not None:
            put(self, "k_unmasked", check_int(self.k_unmasked, "k_unmasked", 1))
        if self.project_against not in PROJECTIONS:
            raise InputError(f"project_against must be one of {PROJECTIONS}, "
                             f"got {self.project_against!r}")
        put(self, "chunk", check_int(self.chunk, "chunk", 1))

    @property
    def power(self) -> PowerIterationConfig:
        """The power-iteration options alone."""
        return PowerIterationConfig(**{f: getattr(self, f) for f in _POWER_FIELDS})

    @property
    def unmasked_k(self) -> int:
        return self.k if self.k_unmasked is None else self.k_unmasked

    @classmethod
    def from_settings(cls, settings: dict[str, Any], **changes: Any) -> RBEConfig:
        """The config a discovery recorded in its settings (older records: the defaults for
        what they lack), with ``changes`` applied."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in settings.items() if k in names}
        return dataclasses.replace(cls(**known), **changes)


@dataclass(frozen=True)
class RBEEditConfig:
    """How an edit along a direction runs (:func:`~diffgeo.editing.rbe.apply_direction`).

    ``t_edit``: where the edit starts (default: the discovery timestep). ``window`` =
    (t_low, t_high): the steps whose starting timestep lies in it are edited (default
    (0, t_edit): the whole generation). ``mode``: ``"x0"`` puts the edited ε in the x̂0 term
    only (the paper), ``"replace"`` in both terms (the authors' code). ``eta``: stochastic
    steps below t_low (Asyrp's quality boosting; > 0 needs a generator). ``rediscover``:
    re-find the directions at every edited step and follow the chosen one.
    """

    t_edit: int | None = None
    window: tuple[int, int] | None = None
    mode: str = "x0"
    eta: float = 0.0
    rediscover: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.t_edit is not None:
            put(self, "t_edit", check_time(self.t_edit, "t_edit"))
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        eta = self.eta
        if (isinstance(eta, bool) or not isinstance(eta, numbers.Real)
                or not math.isfinite(eta) or not eta >= 0):
            raise InputError(f"eta must be a finite number >= 0, got {eta!r}")
        put(self, "eta", float(eta))
        if not isinstance(self.rediscover, bool):
            raise InputError(f"rediscover must be True or False, got {self.rediscover!r}")
        if self.window is not None:
            w = self.window
            # integers on DDPM grids; a flow grid's levels are model times σ·T (floats)
            ok = (isinstance(w, tuple | list) and len(w) == 2
                  and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                          and math.isfinite(v) for v in w) and 0 <= w[0] <= w[1])
            if not ok:
                raise InputError(f"window must be two timesteps (t_low, t_high) with "
                                 f"0 <= t_low <= t_high, got {w!r}")
            put(self, "window", tuple(v if isinstance(v, float) else int(v) for v in w))

    def resolved_window(self, t_edit: int) -> tuple[int, int]:
        """The window for an edit that starts at ``t_edit``, checked against it."""
        lo, hi = (0, t_edit) if self.window is None else self.window
        if hi > t_edit:
            raise InputError(f"window must be two integers (t_low, t_high) with "
                             f"0 <= t_low <= t_high <= t_edit={t_edit}, got {self.window!r}")
        return lo, hi


# ---------------------------------------------------------------------------------- checks


def require_h(backbone: Backbone) -> None:
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


def check_state(backbone: Backbone, x: torch.Tensor, name: str) -> torch.Tensor:
    """One finite state (batch 1) in the backbone's dtype, detached."""
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


def state_mask(backbone: Backbone, mask: Any) -> torch.Tensor:
    """The region mask on the state grid, (1, 1, h, w) in the backbone's dtype and device.

    ``mask`` is drawn on the model's image (``backbone.image_size``), 1 = region to edit. It is
    area-averaged onto the state's spatial grid (:data:`MASK_RULE`), so latent models, whose
    states are smaller than their images, see the fraction of each latent cell in the region.
    Refused: a wrong size, values outside [0, 1], an empty region, and a region that covers the
    whole state (then the unmasked Jacobian J_U is zero and there is nothing to project against:
    use ``global_directions`` for a whole-image direction).
    """
    ms = backbone.state_region(mask, "mask")
    if not bool((ms > 0).any()):
        raise InputError("mask is empty (all zero): mark the region to edit with 1")
    if bool((ms >= 1).all()):
        raise InputError("mask covers the whole image: RBE needs an unmasked region to keep "
                         "unchanged (use global_directions for whole-image directions)")
    return ms
