"""``directions`` and ``apply``: region-based h-space editing (RBE) of an image file (editing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffgeo.verbs.common import (
    backbone_for,
    base_settings,
    prepare_image,
    region_mask,
    result_dir,
    time_grid,
)
from diffgeo.verbs.options import (
    Choice,
    ImageVerbOptions,
    Seeded,
    at_least,
    box,
    floats,
    option,
    time_pair,
    timestep,
)
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone


class Projection(Choice):
    leading = "leading"
    subspace = "subspace"
    none = "none"


class EditMode(Choice):
    x0 = "x0"
    replace = "replace"


@dataclass(frozen=True, kw_only=True)
class DirectionsOptions(ImageVerbOptions, Seeded):
    DIFFERENTIATES = True
    image: Path = option(help="Image whose region to find directions for.", argument=True)
    mask: Path | None = option(None, "Region mask image (white = region).")
    box: tuple[int, int, int, int] | None = option(
        None, "Rectangular region r0,c0,r1,c1 (end exclusive), in input-image pixels.",
        parse=box)
    t: int | float | None = option(
        None, "Discovery timestep, on the DDIM grid (default: the grid point nearest the "
        "paper's 500).", flags=("--t",), parse=timestep)
    steps: int = option(40, "DDIM steps over the full 0..T-1 range (the grid).",
                        check=at_least(1))
    k: int = option(3, "Number of directions.", check=at_least(1))
    project: Projection = option(Projection.leading, "Eq. 14 projection against the unmasked "
                                 "region: leading (the paper), subspace (its top-k), none.")
    preview: tuple[float, ...] = option((-30.0, 0.0, 30.0), "Strengths of the preview strip "
                                        "per direction.", parse=floats, listed=True)


@dataclass(frozen=True, kw_only=True)
class ApplyOptions(ImageVerbOptions, Seeded):
    image: Path = option(help="Image to edit.", argument=True)
    directions: Path = option(help="A directions folder written by `diffgeo directions` "
                              "(its --out DIR, or DIR/directions).")
    index: int = option(0, "Which direction.", check=at_least(0))
    strength: tuple[float, ...] = option((-30.0, 0.0, 30.0), "Edit strengths α, "
                                         "comma-separated.", parse=floats, listed=True)
    mode: EditMode = option(EditMode.x0, "x0: inject into the x̂0-prediction term only (Asyrp, "
                            "as the paper states); replace: edited ε in both terms (the "
                            "authors' released code).")
    window: tuple[int, int] | None = option(None, "Edited timesteps t_low,t_high (default: "
                                            "from the discovery timestep down to 0).",
                                            parse=time_pair)
    eta: float = option(0.0, "Stochastic DDIM below the window (needs --seed).",
                        check=at_least(0))
    mask: Path | None = option(None, "Region for the inside/outside change report (default: "
                               "the discovery mask).")
    rediscover: bool = option(False, "Re-find the directions at every edited step (on the "
                              "unedited path) and follow the chosen one.")
    steps: int | None = option(None, "DDIM steps over the full 0..T-1 range (default: the "
                               "discovery's).", check=at_least(1))

    def differentiates(self) -> bool:
        return self.rediscover  # otherwise only forward passes along a saved direction


def _strip_with_locality(results, name: str, edit, region: torch.Tensor) -> list[dict]:
    results.save_strip(name, [im.float().cpu() for im in edit.strip()])
    return [dict(strength=a, **loc.__dict__)
            for a, loc in zip(edit.strengths, edit.locality(region.cpu()), strict=True)]


@dataclass
class DirectionsResult(Result):
    directions: Any = None  # editing.rbe.Directions
    saved: Path | None = None  # the folder `apply --directions` takes

    def report(self) -> list[str]:
        lines = ["singular values: " + ", ".join(f"{v:.4g}"
                                                 for v in self.settings["singular_values"])]
        return lines + ([f"use --directions {self.saved}"] if self.saved else [])


@register("directions", "editing", DirectionsOptions, out="out/directions", batchable=True)
def directions(opts: DirectionsOptions, backbone: Backbone | None = None,
               progress: bool = False
               ) -> DirectionsResult:
    """Region-based editing: unsupervised h-space directions that change a masked region (power
    iteration on the masked Jacobian, projected against the rest); saves them and a preview
    strip per direction."""
    from diffgeo.editing.rbe import RBEConfig, apply_direction, discover_directions

    bb = backbone_for(opts, backbone)
    names = ["settings.json", *(f"direction-{i}.png" for i in range(opts.k)),
             "directions/directions.json", "directions/directions.safetensors"]
    results = result_dir(opts, names, [opts.image])
    x, fit_info, cond = prepare_image(bb, opts.image, opts)
    region = region_mask(bb, fit_info, opts.mask, opts.box)
    grid = time_grid(bb, opts.steps)
    with torch.no_grad():
        state = bb.to_state(x)
    config = RBEConfig(t=opts.t, k=opts.k, project_against=str(opts.project))
    dirs = discover_directions(bb, state, region[0, 0], config, grid=grid, cond=cond,
                               generator=torch.Generator().manual_seed(opts.seed),
                               progress=progress)
    settings = base_settings("directions", opts, bb, grid, t=dirs.timestep)
    settings.update({
        "image": str(opts.image), "t": dirs.timestep, "num_steps": opts.steps, "k": opts.k,
        "project": str(opts.project), "preview": list(opts.preview), "prompt": opts.prompt,
        "fit": fit_info.to_dict(), "seed": opts.seed,
        "singular_values": dirs.singular_values.tolist(), "discovery": dirs.settings,
    })
    if results is not None:
        # staged like every result (the directions' own files, checked like the others)
        dirs.save(results.path_for("directions/directions.json").parent, force=True)
        settings["previews"] = [
            _strip_with_locality(results, f"direction-{i}.png",
                                 apply_direction(bb, state, dirs, i, list(opts.preview),
                                                 cond=cond, progress=progress), region)
            for i in range(dirs.k)]
        results.save_json("settings.json", settings)
    saved = None if results is None else results.path / "directions"
    return DirectionsResult(settings, dirs, saved)


@dataclass
class ApplyResult(Result):
    edit: Any = None  # editing.rbe.EditResult

    def report(self) -> list[str]:
        return [f"α={loc['strength']:+g}: MSE inside {loc['mse_inside']:.3g}, outside "
                f"{loc['mse_outside']:.3g}" for loc in self.settings.get("locality", [])]


@register("apply", "editing", ApplyOptions, out="out/apply", batchable=True,
          compared="strengths")
def apply(opts: ApplyOptions, backbone: Backbone | None = None,
          progress: bool = False) -> ApplyResult:
    """Edit IMAGE along a discovered h-space direction at several strengths; writes a strip
    and the change inside vs outside the region."""
    from diffgeo.editing.rbe import Directions, RBEEditConfig, apply_direction
    from diffgeo.io import load_mask

    bb = backbone_for(opts, backbone)
    dirs = Directions.load(opts.directions)
    results = result_dir(opts, ("result.png", "settings.json"), [opts.image])
    x, fit_info, cond = prepare_image(bb, opts.image, opts)
    grid = None if opts.steps is None else time_grid(bb, opts.steps)
    with torch.no_grad():
        state = bb.to_state(x)
    gen = torch.Generator().manual_seed(opts.seed) if opts.eta > 0 else None
    config = RBEEditConfig(window=opts.window, mode=str(opts.mode), eta=opts.eta,
                           rediscover=opts.rediscover)
    edit = apply_direction(bb, state, dirs, opts.index, list(opts.strength), config, grid=grid,
                           generator=gen, cond=cond, progress=progress)
    if opts.mask is not None:
        region = load_mask(opts.mask, bb.image_size, fit_info, input_size=fit_info.in_size)
    elif dirs.mask is not None:
        region = torch.nn.functional.interpolate(dirs.mask[None, None].float(),
                                                 size=tuple(bb.image_size), mode="nearest")
    else:
        region = None
    settings = base_settings("apply", opts, bb, grid, window=tuple(edit.window))
    settings.update({
        "image": str(opts.image), "directions": str(opts.directions), "index": opts.index,
        "strengths": list(opts.strength), "mode": str(opts.mode), "window": list(edit.window),
        "eta": opts.eta, "prompt": opts.prompt, "fit": fit_info.to_dict(), "seed": opts.seed,
        "edited_timesteps": edit.edited_timesteps, "rediscover": opts.rediscover,
        "rediscover_alignment": edit.settings.get("rediscover_alignment", []),
    })
    if results is not None:
        if region is not None:
            settings["locality"] = _strip_with_locality(results, "result.png", edit, region)
        else:
            results.save_strip("result.png", [im.float().cpu() for im in edit.strip()])
        for j, im in enumerate(edit.images):
            results.save_image(f"edit-{j}.png", im[None].float().cpu())
        results.save_json("settings.json", settings)
    return ApplyResult(settings, edit)
