"""Editing along an RBE direction: Asyrp's asymmetric reverse process on the one sampler
(step 6 of the method)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.editing.rbe.config import (
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    RBEConfig,
    RBEEditConfig,
    check_state,
    require_h,
)
from diffgeo.editing.rbe.directions import Directions
from diffgeo.editing.rbe.discovery import directions_at
from diffgeo.errors import InputError
from diffgeo.metrics import Locality, edit_locality
from diffgeo.sampling import (
    Grid,
    Trajectory,
    alpha_bar,
    ddim_step,
    eps_model,
    invert,
    predict_x0,
    sample,
    signal_noise,
)


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

    Flow-matching models take the same form with (signal, noise) = (1 − σ, σ) in place of
    (√ᾱ, √(1 − ᾱ)): P_t = (x − σ·ε_edit)/(1 − σ), D_t = σ_prev·ε_orig; ε_edit == ε_orig is
    then the flow Euler step (t < T: at σ = 1 ε carries no x̂0).
    """
    if backbone.prediction_type == "flow":
        (a, b), (a_prev, b_prev) = signal_noise(backbone, t), signal_noise(backbone, t_prev)
        if a <= 0:
            raise InputError("an x̂0 edit at sigma = 1 is undefined: edit below the top of "
                             "the grid")
        p_t = (x - b * eps_edit) / a
        d_t = b_prev * eps_orig
        return a_prev * p_t + d_t, p_t, d_t
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
                    strengths: Sequence[float] = (-DEFAULT_STRENGTH, DEFAULT_STRENGTH),
                    config: RBEEditConfig | None = None, *, grid: Grid | int | None = None,
                    generator: torch.Generator | None = None,
                    cond: Conditioning | None = None, progress: bool = False) -> EditResult:
    """Edit the image ``x0`` (clean state, batch 1) along ``directions.vectors[index]``.

    Inverts x0 to ``config.t_edit`` (default: the discovery timestep) on ``grid`` (a Grid or a
    number of steps on the model's grid; default: the discovery's number of steps, else 40) and
    generates back once per strength α. Every step whose starting timestep lies in the config's
    ``window`` = (t_low, t_high) (default (0, t_edit): the whole generation; see the package
    docstring) is an asymmetric step: encoder once on the current state, ε_orig = ε(h),
    ε_edit = ε(h + α·v); ``mode="x0"`` puts ε_edit in the x̂0 term only (the paper),
    ``"replace"`` in both terms (the authors' code). Other steps are plain DDIM; those below
    t_low use ``eta`` (> 0 needs ``generator``; every strength replays the same noise, so
    strengths differ only by the edit). α = 0 reproduces ``sampling.generate`` exactly. One
    generation per strength plus one for the reconstruction (α = 0).

    ``rediscover=True`` re-finds the directions at every edited timestep, on the unedited
    generation path (the reconstruction's states), with the discovery's mask and settings; the
    direction used at each step is the one most aligned with the previous step's (starting from
    ``directions.vectors[index]``), sign-matched to it, so one edit follows one direction as it
    moves. Costs one discovery per edited step; ``settings["rediscover_alignment"]`` records
    |cos| between consecutive steps' directions.
    """
    require_h(backbone)
    x0 = check_state(backbone, x0, "x0")
    if config is None:
        config = RBEEditConfig()
    if not isinstance(config, RBEEditConfig):
        raise InputError(f"config must be an RBEEditConfig, got {type(config).__name__}")
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
    h_shape = tuple(backbone.h_shape())
    where = "directions" if directions.source is None else f"the directions in {directions.source}"
    if directions.h_shape != h_shape:
        raise InputError(f"{where} have h shape {directions.h_shape} but this backbone's h is "
                         f"{h_shape}: they were found with another model or resolution")
    found = directions.settings.get("backbone")
    found_block = found.get("h_block") if isinstance(found, dict) else None
    block = getattr(backbone, "h_block", None)
    if found_block is not None and block is not None and found_block != block:
        raise InputError(f"{where} were found with h at block {found_block}, but this backbone's "
                         f"h is block {block}: load the model with h_block={found_block} (CLI: "
                         f"--h-block {found_block})")
    if not 0 <= directions.timestep < backbone.num_train_timesteps:
        raise InputError(f"{where} were found at t={directions.timestep}, outside this model's "
                         f"0..{backbone.num_train_timesteps - 1}: they come from another model")
    t_edit = directions.timestep if config.t_edit is None else config.t_edit
    if grid is None:
        grid = directions.num_steps or DEFAULT_STEPS
    g = Grid.resolve(backbone, grid).up_to(t_edit)
    lo, hi = config.resolved_window(t_edit)
    mode, eta = config.mode, config.eta
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
    plain = eps_model(backbone, cond)

    def consumed(out: torch.Tensor, enc) -> torch.Tensor:
        return out if g.flow else backbone.to_eps(out, enc.x, enc.timesteps)

    def run(alpha: float) -> Trajectory:
        if rng_state is not None and generator is not None:
            generator.set_state(rng_state)

        def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            # what the step consumes: ε, or a flow model's velocity (its native output)
            if not lo <= t <= hi:
                return plain(x, t)
            # encoder once; the original and the edited h share its skips
            enc = backbone.encode(x, t, cond)
            eps_orig = consumed(backbone.decode(enc, enc.h), enc)
            eps_edit = consumed(backbone.decode(enc, enc.h + alpha * per_step.get(t, v)), enc)
            return eps_edit, (eps_edit if mode == "replace" else eps_orig)

        return sample(backbone, xt, g, eps_fn=eps_fn, generator=generator,
                      eta=lambda t: eta if t < lo else 0.0, progress=progress,
                      desc=f"edit {alpha:+g}")

    recon = run(0.0)
    path = {t: recon.at(t) for t in edited}
    recon_state = recon.last
    alignment: list[float] = []
    if config.rediscover:
        per_step.update(_track_directions(backbone, path, directions, v, cond, alignment))
    states = torch.cat([run(a).last for a in alphas])
    settings: dict[str, Any] = dict(
        index=index, strengths=alphas, t_edit=t_edit, num_steps=g.num_steps, grid=g.to_dict(),
        window=[lo, hi], mode=mode, eta=eta, edited_steps=len(edited),
        rediscover=config.rediscover, rediscover_alignment=alignment,
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
    # the discovery's own settings (older records: the defaults for what they lack)
    config = RBEConfig.from_settings(s, t=None, k=directions.k,
                                     oversample=int(s.get("oversample", 0) or 0))
    mask = None
    if directions.mask is not None:  # back to image resolution (exact under area averaging)
        mask = F.interpolate(directions.mask.reshape(1, 1, *directions.mask.shape[-2:]).float(),
                             size=tuple(backbone.image_size), mode="nearest")[0, 0]
    prev = v.flatten()
    out: dict[int, torch.Tensor] = {}
    for t in sorted(path, reverse=True):
        found = directions_at(
            backbone, path[t], t, mask, config, cond=cond,
            generator=torch.Generator().manual_seed(int(s.get("seed", 0) or 0)))
        cands = found.vectors.to(device=prev.device, dtype=prev.dtype).flatten(1)
        cos = cands @ prev / (cands.norm(dim=1) * prev.norm()).clamp_min(1e-30)
        j = int(cos.abs().argmax())
        chosen = cands[j] * (1.0 if float(cos[j]) >= 0 else -1.0)
        alignment.append(float(cos[j].abs()))
        out[t] = chosen.reshape(v.shape)
        prev = chosen
    return out
