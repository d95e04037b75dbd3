"""``curves`` and ``saliency-map``: generation curves and whole-image rate maps along an image
file's inversion path (analysis)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffgeo.errors import InputError
from diffgeo.verbs.common import (
    backbone_for,
    base_settings,
    check_memory,
    prepare_image,
    result_dir,
    time_grid,
)
from diffgeo.verbs.options import (
    Choice,
    ImageVerbOptions,
    Seeded,
    at_least,
    box,
    option,
    point,
    timestep,
)
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone


class Definition(Choice):
    exact = "exact"
    eps = "eps"
    h_proj = "h-proj"
    h = "h"


#: A rate definition, or all four side by side (Fig. 5).
CurveDefinition = Choice("CurveDefinition",  # type: ignore[misc]
                         {**{d.name: d.value for d in Definition}, "all": "all"})


class Estimator(Choice):
    probe = "probe"
    lowrank = "lowrank"
    gram = "gram"
    loop = "loop"


class PerceptualMode(Choice):
    multiply = "multiply"
    crop = "crop"


_T_HELP = "Top of the path (default: the top of the DDIM grid)."


@dataclass(frozen=True, kw_only=True)
class PathOptions(ImageVerbOptions):
    """The inversion path and the fluctuation statistic both verbs read off it."""

    DIFFERENTIATES = True
    t: int | float | None = option(None, _T_HELP, flags=("--t",), parse=timestep)
    k: int = option(3, "Tangent-space dimension for the projected definitions.",
                    check=at_least(1))
    window: int = option(5, "Fluctuation: sliding-window length.", check=at_least(1))
    t_min: int = option(200, "Fluctuation: only timesteps above this.")


# No seed: the curves are exact derivatives along a deterministic path.
@dataclass(frozen=True, kw_only=True)
class CurvesOptions(PathOptions):
    image: Path = option(help="Image whose generation curves to trace.", argument=True)
    pixel: tuple[tuple[int, int], ...] = option(
        (), "A pixel R,C in input-image pixels (row, column); repeatable.", parse=point)
    mask: Path | None = option(None, "A region (mask image, white = region): one curve, the "
                               "average of its pixels' rates (Eq. 7).")
    box: tuple[int, int, int, int] | None = option(
        None, "A rectangular region r0,c0,r1,c1 (end exclusive), in input-image pixels.",
        parse=box)
    row: tuple[int, ...] = option((), "A whole image row (average); repeatable.")
    col: tuple[int, ...] = option((), "A whole image column; repeatable.")
    definition: CurveDefinition = option(
        CurveDefinition.h, "exact (‖Df⁻¹[Proj v]‖, Eq. 6/8), eps (‖Dε[Proj v]‖), h-proj "
        "(‖Dh[Proj v]‖), h (‖Dh[v]‖, the differentiable one), or all (the four, Fig. 5).")
    channel: int | None = option(None, "One state channel instead of all.")
    perceptual: str | None = option(
        None, "Also the region's perceptual-based curve (App. C.2) with this DINO model (hub "
        "id or folder, e.g. facebook/dino-vits16); needs --mask or --box.")
    perceptual_mode: PerceptualMode = option(
        PerceptualMode.multiply, "DINO masking: multiply (the paper's I⊙M) or crop (also crop "
        "to the region's box).")

    def validate(self) -> None:
        super().validate()
        if not (self.pixel or self.row or self.col or self.mask or self.box):
            raise InputError("give at least one component: --pixel, --row, --col, --mask or "
                             "--box")
        if self.perceptual is not None and self.mask is None and self.box is None:
            raise InputError("the perceptual curve is object-wise: give --mask or --box")


@dataclass(frozen=True, kw_only=True)
class SaliencyOptions(PathOptions, Seeded):
    image: Path = option(help="Image to map.", argument=True)
    definition: Definition = option(Definition.h, "Rate definition: h (default), h-proj, eps, "
                                    "exact.")
    estimator: Estimator | None = option(
        None, "probe (Gaussian-probe column norms, for h), lowrank (h), gram (projected "
        "definitions) or loop (one JVP per pixel, the slow reference).")
    probes: int = option(64, "Probe estimator: number of probes K (per-pixel relative std of "
                         "the rate ≈ sqrt(1/(2K))).", check=at_least(1))

    def validate(self) -> None:
        super().validate()
        projected = self.definition is not Definition.h
        if self.estimator is Estimator.gram and not projected:
            raise InputError("estimator 'gram' needs a projected definition (exact, eps, "
                             "h-proj); use probe or lowrank for h")
        if self.estimator in (Estimator.probe, Estimator.lowrank) and projected:
            raise InputError(f"estimator {str(self.estimator)!r} is for the unprojected 'h' "
                             "definition; use 'gram' or 'loop' for projected ones")


def _invert(bb, x, opts: PathOptions, cond, progress: bool):
    from diffgeo.curves import check_window
    from diffgeo.sampling import invert

    grid = time_grid(bb, opts.steps)
    t_top = grid.top if opts.t is None else grid.check(opts.t, "--t")
    levels = list(grid.up_to(t_top))  # the curves' timesteps
    check_window(levels, opts.window, min(opts.t_min, levels[-1] - 1))
    with torch.no_grad():
        state = bb.to_state(x)
    return grid, t_top, invert(bb, state, t_top, grid, cond, progress=progress)


@dataclass
class CurvesResult(Result):
    curves: dict[str, Any] | None = None  # definition -> curves.Curves
    perceptual: Any = None

    def report(self) -> list[str]:
        return [f"{d:7s} {label:24s} fluctuation {f:.4g}"
                for d, per in self.settings["fluctuation"].items() for label, f in per.items()]


def _components(bb, opts: CurvesOptions, fit_info) -> list:
    from diffgeo import curves as C
    from diffgeo.io import box_mask, fit_tensor, load_mask

    comps = [C.pixel_component(bb, fit_info.map_pixel(p, "--pixel"), opts.channel)
             for p in opts.pixel]
    # Rows and columns are mapped through the image's centre line: the crop may cut away the
    # edges, never the centre.
    for r in opts.row:
        rr, _ = fit_info.map_pixel((r, fit_info.in_size[1] // 2), "--row")
        comps.append(C.row_component(bb, rr, opts.channel))
    for c in opts.col:
        _, cc = fit_info.map_pixel((fit_info.in_size[0] // 2, c), "--col")
        comps.append(C.column_component(bb, cc, opts.channel))
    if opts.mask is not None:
        m = load_mask(opts.mask, bb.image_size, fit_info, input_size=fit_info.in_size)
        comps.append(C.mask_component(bb, m[0, 0], "mask", opts.channel))
    if opts.box is not None:
        m, _ = fit_tensor(box_mask(opts.box, fit_info.in_size), bb.image_size, fit_info,
                          is_mask=True)
        comps.append(C.mask_component(bb, m[0, 0], "box", opts.channel))
    return comps


def _component_mask(bb, comp) -> torch.Tensor:
    """The image-resolution mask (H, W) of the state cells a component covers."""
    from diffgeo.curves import state_cell

    H, W = bb.image_size
    h, w = bb.state_shape[-2:]
    m = torch.zeros(H, W)
    for p in comp.pixels:
        r, c = state_cell(bb, p)
        m[r * H // h:(r + 1) * H // h, c * W // w:(c + 1) * W // w] = 1.0
    return m


@register("curves", "analysis", CurvesOptions, out="out/curves", batchable=True)
def curves(opts: CurvesOptions, backbone: Backbone | None = None,
           progress: bool = False) -> CurvesResult:
    """Generation curves of pixels, regions, rows or columns along IMAGE's DDIM inversion path,
    with their fluctuation (the saliency statistic); writes curves.png/.csv/.npz."""
    from diffgeo import curves as C

    every = opts.definition is CurveDefinition.all
    defs = list(C.DEFINITIONS) if every else [str(opts.definition)]
    names = ["curves.png", "curves.csv", "curves.npz", "settings.json"]
    names += ["definitions.png"] if every else []
    names += ["perceptual.png"] if opts.perceptual is not None else []
    bb = backbone_for(opts, backbone)
    results = result_dir(opts, names, [opts.image])
    x, fit_info, cond = prepare_image(bb, opts.image, opts)
    comps = _components(bb, opts, fit_info)
    grid, t_top, inv = _invert(bb, x, opts, cond, progress)
    bases = None
    if any(d in C.PROJECTED for d in defs):  # one set of bases serves every definition
        from diffgeo.tangent import tangent_bases_along

        bases = tangent_bases_along(bb, inv, k=opts.k, cond=cond, oversample=4,
                                    progress=progress)
    by_def = {d: C.generation_curves(bb, inv, comps, d, cond, k=opts.k, bases=bases,
                                     progress=progress) for d in defs}
    main = by_def[defs[0]]
    flucts = {d: [float(v) for v in c.fluctuation(opts.window,
                                                  min(opts.t_min, c.timesteps[-1] - 1))]
              for d, c in by_def.items()}
    percep, region = None, None
    if opts.perceptual is not None:
        from diffgeo.perceptual import DinoFeatures, perceptual_curve

        region = next(i for i, c in enumerate(comps) if c.label in ("mask", "box"))
        percep = perceptual_curve(bb, inv, x, _component_mask(bb, comps[region]),
                                  DinoFeatures.load(opts.perceptual, opts.device), cond,
                                  str(opts.perceptual_mode))
    settings = base_settings("curves", opts, bb, grid, t=t_top)
    settings.update({
        "image": str(opts.image), "definition": str(opts.definition), "t": t_top,
        "num_steps": opts.steps, "k": opts.k, "channel": opts.channel, "window": opts.window,
        "t_min": opts.t_min, "prompt": opts.prompt, "fit": fit_info.to_dict(),
        "components": [c.label for c in comps],
        "fluctuation": {d: dict(zip(main.labels, f, strict=True)) for d, f in flucts.items()},
    })
    if percep is not None:
        settings["perceptual"] = {"model": opts.perceptual, "mode": str(opts.perceptual_mode),
                                  "distance": percep.distance.tolist(),
                                  "rate": percep.rate.tolist()}
    res = CurvesResult(settings, by_def, percep)
    if results is not None:
        _write_curves(results, res, x, comps, defs, t_top, region)
    return res


def _write_curves(results, res: CurvesResult, x, comps, defs, t_top, region) -> None:
    from diffgeo.io import to_uint8
    from diffgeo.plots import curves_figure, definitions_figure, line_plot, normalise01

    by_def = res.curves
    main = by_def[defs[0]]
    curves_figure(to_uint8(x.float().cpu()), main.timesteps, main.values.numpy(), main.labels,
                  [c.pixels for c in comps], results.path_for("curves.png"),
                  f"generation curves ({defs[0]}), inversion to t={t_top}")
    rows = [[tt] + [float(v) for d in defs for v in by_def[d].values[:, j]]
            for j, tt in enumerate(main.timesteps)]
    header = ["t"] + [f"{d}:{lab}" for d in defs for lab in main.labels]
    results.save_csv("curves.csv", header, rows)
    results.save_npz("curves.npz", timesteps=torch.tensor(main.timesteps),
                     **{f"values_{d}": c.values for d, c in by_def.items()})
    if res.perceptual is not None:
        line_plot(main.timesteps, {
            f"ours ({defs[0]})": normalise01(main.values[region].numpy()),
            "perceptual (DINO)": normalise01(res.perceptual.rate.numpy()),
        }, results.path_for("perceptual.png"), "t", "normalised rate",
            f"{comps[region].label}: perceptual-based vs generation curve", invert_x=True)
    if len(defs) > 1:
        definitions_figure({d: c.timesteps for d, c in by_def.items()},
                           {d: c.values[0].numpy() for d, c in by_def.items()},
                           results.path_for("definitions.png"),
                           f"{main.labels[0]}: the four definitions (normalised)")
    results.save_json("settings.json", res.settings)


@dataclass
class SaliencyResult(Result):
    maps: Any = None  # maps.RateMaps
    saliency: torch.Tensor | None = None

    def report(self) -> list[str]:
        return [f"estimator {self.settings['estimator']} (per-pixel relative std "
                f"{self.settings['relative_std_per_cell']:.3f})"]


@register("saliency-map", "analysis", SaliencyOptions, out="out/saliency", batchable=True)
def saliency_map(opts: SaliencyOptions, backbone: Backbone | None = None,
                 progress: bool = False
                 ) -> SaliencyResult:
    """Whole-image generation-rate maps along IMAGE's inversion path and the saliency map (the
    fluctuation of every pixel's curve), with an overlay; writes saliency.png, rate_maps.npz."""
    from diffgeo.io import to_uint8
    from diffgeo.maps import default_estimator, rate_maps_along, upsample_to_image
    from diffgeo.plots import heatmap_figure

    bb = backbone_for(opts, backbone)
    results = result_dir(opts, ("saliency.png", "rate_maps.npz", "settings.json"), [opts.image])
    estimator = None if opts.estimator is None else str(opts.estimator)
    if (estimator or default_estimator(str(opts.definition))) == "probe":
        # the probes and their vector-Jacobian products, one h-sized tensor each
        check_memory(opts, bb, 2 * opts.probes * math.prod(bb.h_shape()) * bb.dtype.itemsize,
                     "the probe estimator", "--probes")
    x, fit_info, cond = prepare_image(bb, opts.image, opts)
    grid, t_top, inv = _invert(bb, x, opts, cond, progress)
    maps = rate_maps_along(bb, inv, str(opts.definition), estimator, cond, probes=opts.probes,
                           seed=opts.seed, k=opts.k, progress=progress)
    sal = maps.saliency(opts.window, min(opts.t_min, maps.timesteps[-1] - 1))
    settings = base_settings("saliency-map", replace(opts, estimator=maps.estimator), bb, grid,
                             t=t_top)
    settings.update({
        "image": str(opts.image), "definition": str(opts.definition),
        "estimator": maps.estimator, "relative_std_per_cell": maps.relative_std,
        "probes": opts.probes, "t": t_top, "num_steps": opts.steps, "k": opts.k,
        "window": opts.window, "t_min": opts.t_min, "prompt": opts.prompt,
        "fit": fit_info.to_dict(), "seed": opts.seed,
    })
    if results is not None:
        heatmap_figure(to_uint8(x.float().cpu()), upsample_to_image(sal, bb.image_size).numpy(),
                       results.path_for("saliency.png"),
                       f"saliency = curve fluctuation ({opts.definition}, {maps.estimator})",
                       label="fluctuation")
        results.save_npz("rate_maps.npz", timesteps=torch.tensor(maps.timesteps),
                         maps=maps.values, saliency=sal)
        results.save_json("settings.json", settings)
    return SaliencyResult(settings, maps, sal)
