"""``transfer``, ``remove``, ``adjust-saliency``, ``blend``: curve matching (Algorithm 1) on an
image file (editing). The method's settings are :class:`CurveMatchingConfig`'s: its defaults
are the options' defaults and its ``validate`` their checks, so an option exists once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diffgeo.editing.curve_matching import CurveMatchingConfig
from diffgeo.errors import InputError
from diffgeo.verbs.common import (
    backbone_for,
    base_settings,
    prepare_image,
    region_mask,
    result_dir,
    time_grid,
)
from diffgeo.verbs.options import Choice, ImageVerbOptions, Seeded, box, option, point, timestep
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone

_CFG = CurveMatchingConfig()
FILES = ("input.png", "result.png", "strip.png", "curves.png", "history.csv", "settings.json")


class Mode(Choice):
    fast = "fast"
    faithful = "faithful"


@dataclass(frozen=True, kw_only=True)
class CurveEditOptions(ImageVerbOptions, Seeded):
    DIFFERENTIATES = True
    #: The preset of editing.tasks this verb runs (it also sets the default iterations).
    TASK: ClassVar[str] = ""

    image: Path = option(help="Image to edit.", argument=True)
    iterations: int | None = option(None, "Adam iterations (default: 300; 70 saliency; 100 "
                                    "blend).")
    t: int | float | None = option(
        _CFG.t, "Timestep of the optimised X_t (on the DDIM grid; default: the grid point "
        "nearest the paper's 700).", flags=("--t",), parse=timestep)
    lr: float = option(_CFG.lr, "Adam learning rate.")
    mode: Mode = option(Mode(_CFG.mode), "fast: reuse the path's ΔX between refreshes; "
                        "faithful: re-integrate X_t → X_tk every iteration (the paper).")
    pixels_per_iteration: int | None = option(
        None, "(pixel, timestep) pairs per iteration, one batched JVP (default: 4 in fast "
        "mode, 1 in faithful mode as the paper).")
    pairs_per_jvp: int | None = option(
        None, "Differentiate the iteration's pairs in chunks of N (same result, less memory: "
        "for large images on a GPU). [default: all pairs at once]")
    walk_dtype: str | None = option(
        None, "Run the derivative-free walks (ΔX, refreshes) in bfloat16 or float16 under "
        "autocast; derivatives stay in the model's dtype. [default: the model's dtype]")
    derivative: str | None = option(
        None, "How the rates' derivative is taken: exact (forward-mode JVP, the paper) or "
        "difference (central difference of h: no forward-mode AD, a plain backward; agrees "
        "to ~1e-4). [default: difference in fast mode on float32/float64, else exact]")
    match_outside_stats: bool = option(
        _CFG.match_outside_stats, "After every step, standardise the region of X_t to the "
        "unedited X_t's per-channel mean and std outside it (our addition; keeps removal from "
        "painting a new object).", flags=("--match-outside-stats",))
    refresh_every: int = option(_CFG.refresh_every, "Recompute the path and the sampling "
                                "curve every N iterations (m in Algorithm 1).")
    refresh_drift: float | None = option(
        None, "Re-walk the path whenever X_t has moved by more than this fraction of its norm "
        "since the last walk (ours; 0: off). Fast mode's reused path goes stale with that move. "
        "Fast mode only. [default: 0.05 in fast mode]")
    blend_every: int = option(_CFG.blend_every, "Blend the outside of X_t back every N "
                              "iterations.")
    lambda1: float = option(_CFG.lambda1, "Saliency/blend loss: weight λ1 of the rate term "
                            "λ1·r^λ2 (App. D).", flags=("--lambda1",))
    feature_weight: float = option(_CFG.feature_weight, "Saliency/blend loss: weight of the "
                                   "decoder feature-alignment term (0 drops it).")
    snapshot_every: int = option(_CFG.snapshot_every, "Keep an intermediate result every N "
                                 "iterations (strip.png).")
    no_localized: bool = option(not _CFG.localized, "Skip the localized blending of X_t.",
                                flags=("--no-localized",))
    decode_blend: bool = option(
        _CFG.decode_blend, "Also paste the unedited path outside the region at every decode "
        "step above --t-blend (our addition: keeps the outside on small images); "
        "--paper-decode decodes as the paper does.", flags=("--decode-blend/--paper-decode",))
    t_blend: int = option(_CFG.t_blend, "Blend X_t (and, with --decode-blend, the decode) only "
                          "above this timestep.", flags=("--t-blend",))
    prompt: str = option("", "Text prompt for conditional models (the paper uses the empty "
                         "prompt); conditions every U-Net call of the edit.")

    def config(self, grid: Any = None) -> CurveMatchingConfig:
        """The method's config; ``grid`` (the verb's, once the backbone is known) or the
        number of steps, under the config's name for it."""
        names = {f.name for f in dataclasses.fields(CurveMatchingConfig)}
        if "grid" in names:
            grid_field, steps = "grid", self.steps if grid is None else grid
        else:  # the config builds the model's Grid from the number of steps itself
            grid_field, steps = "num_steps", self.steps
        return CurveMatchingConfig(
            t=self.t, iterations=self.iterations, lr=self.lr,
            mode=str(self.mode), refresh_every=self.refresh_every,
            refresh_drift=self.refresh_drift, blend_every=self.blend_every,
            t_blend=self.t_blend, localized=not self.no_localized,
            decode_blend=self.decode_blend, snapshot_every=self.snapshot_every,
            pixels_per_iteration=self.pixels_per_iteration, pairs_per_jvp=self.pairs_per_jvp,
            walk_dtype=self.walk_dtype, derivative=self.derivative,
            match_outside_stats=self.match_outside_stats,
            lambda1=self.lambda1, feature_weight=self.feature_weight, seed=self.seed,
            **{grid_field: steps})

    def validate(self) -> None:
        super().validate()
        self.config().validate()
        if (getattr(self, "mask", None) is None) == (getattr(self, "box", None) is None):
            raise InputError("give exactly one region: --mask FILE or --box r0,c0,r1,c1")


@dataclass(frozen=True, kw_only=True)
class _Region:
    mask: Path | None = option(None, "Region mask image (white = region).")
    box: tuple[int, int, int, int] | None = option(
        None, "Rectangular region r0,c0,r1,c1 (end exclusive).", parse=box)


@dataclass(frozen=True, kw_only=True)
class TransferOptions(_Region, CurveEditOptions):
    TASK = "transfer"
    reference: tuple[int, int] = option(help="Reference pixel R,C whose curve the region "
                                        "copies.", parse=point)


@dataclass(frozen=True, kw_only=True)
class RemoveOptions(_Region, CurveEditOptions):
    TASK = "remove"
    reference: tuple[int, int] | None = option(
        None, "A background pixel R,C whose curve the object copies; without it the rate is "
        "minimised.", parse=point)


@dataclass(frozen=True, kw_only=True)
class AdjustSaliencyOptions(_Region, CurveEditOptions):
    TASK = "saliency"
    increase: bool = option(False, "Make the region more salient.", flags=("--increase",))
    decrease: bool = option(False, "Make the region less salient.", flags=("--decrease",))

    def validate(self) -> None:
        if self.increase == self.decrease:
            raise InputError("give exactly one of --increase or --decrease")
        super().validate()


@dataclass(frozen=True, kw_only=True)
class BlendOptions(CurveEditOptions):
    TASK = "blend"
    image: Path = option(help="A composite (foreground pasted on a background).", argument=True)
    mask: Path | None = option(None, "Foreground mask (white = pasted).")

    def validate(self) -> None:
        if self.mask is None:  # blend has no --box: the region is the pasted foreground
            raise InputError("blend needs --mask FILE: the foreground mask (white = pasted)")
        super().validate()


@dataclass
class CurveEditResult(Result):
    image: torch.Tensor | None = None
    method: Any = None  # editing.curve_matching.CurveMatchingResult

    def report(self) -> list[str]:
        return [f"final loss {self.settings['final_loss']:.4g} (mean of the last 10: "
                f"{self.settings['mean_loss_last_10']:.4g})"]


def _run(verb: str, opts: CurveEditOptions, backbone, progress: bool) -> CurveEditResult:
    from diffgeo.editing import tasks
    from diffgeo.metrics import edit_locality

    bb = backbone_for(opts, backbone)
    results = result_dir(opts, FILES, [opts.image])
    x, fit_info, cond = prepare_image(bb, opts.image, opts)
    region = region_mask(bb, fit_info, opts.mask, getattr(opts, "box", None))[0, 0].cpu().numpy()
    reference = getattr(opts, "reference", None)
    ref = None if reference is None else fit_info.map_pixel(reference, "--reference")
    grid = time_grid(bb, opts.steps)
    cfg = opts.config(grid)
    if opts.TASK == "transfer":
        res = tasks.transfer(bb, x, region, ref, cfg, cond, progress)
    elif opts.TASK == "remove":
        res = tasks.remove(bb, x, region, ref, cfg, cond, progress)
    elif opts.TASK == "saliency":
        direction = "increase" if getattr(opts, "increase", False) else "decrease"
        res = tasks.saliency(bb, x, region, direction, cfg, cond, progress)
    else:
        res = tasks.blend(bb, x, region, cfg, cond, progress)
    loc = edit_locality(x.float().cpu(), res.image.float(), torch.from_numpy(region))
    used = res.settings  # the method's config as it ran: defaults resolved
    settings = base_settings(verb, opts, bb, grid, t=used.get("t", opts.t),
                             iterations=used.get("iterations", opts.iterations),
                             pixels_per_iteration=cfg.batch,
                             refresh_drift=cfg.drift_tolerance)
    settings.update({
        "image": str(opts.image), "reference": list(reference) if reference else None,
        "fit": fit_info.to_dict(), "prompt": opts.prompt, "curve_matching": res.settings,
        "final_loss": res.losses[-1],
        "mean_loss_last_10": float(sum(res.losses[-10:]) / len(res.losses[-10:])),
        "locality": {"mse_inside": loc.mse_inside, "mse_outside": loc.mse_outside},
    })
    out = CurveEditResult(settings, res.image, res)
    if results is not None:
        _write(results, verb, x, res, settings)
    return out


def _write(results, verb: str, x: torch.Tensor, res, settings: dict) -> None:
    from diffgeo.plots import line_plot

    results.save_image("input.png", x.float().cpu())
    results.save_image("result.png", res.image)
    results.save_strip("strip.png", [x.float().cpu(), *[im for _, im in res.snapshots],
                                     res.image])
    series = {"region pixel, before": res.region_curve_before.numpy(),
              "region pixel, after": res.region_curve_after.numpy()}
    if res.reference_curve is not None:
        series["reference"] = res.reference_curve.numpy()
    line_plot(res.timesteps, series, results.path_for("curves.png"), "t", "‖Dh[e_ij]‖",
              f"{verb}: generation curves before/after", invert_x=True)
    # One row per (pixel, timestep) pair; iteration_loss is what Adam stepped on.
    results.save_csv("history.csv", ["iteration", "pair", "iteration_loss", "loss", "rate",
                                     "t_k", "row", "col", "blended", "drift", "rewalked"],
                     [[h["iteration"], i, h["loss"], s["loss"], s["rate"], s["t_k"],
                       *s["pixel"], h["blended"], h["drift"], h["rewalked"]]
                      for h in res.history for i, s in enumerate(h["samples"])])
    results.save_json("settings.json", settings)


_EDIT = dict(batchable=True, compared=("input.png", "result.png"))


@register("transfer", "editing", TransferOptions, out="out/transfer", **_EDIT)
def transfer(opts: TransferOptions, backbone: Backbone | None = None,
             progress: bool = False) -> CurveEditResult:
    """Semantic transfer by curve matching: the region's generation curves are matched to the
    reference pixel's."""
    return _run("transfer", opts, backbone, progress)


@register("remove", "editing", RemoveOptions, out="out/remove", **_EDIT)
def remove(opts: RemoveOptions, backbone: Backbone | None = None,
           progress: bool = False) -> CurveEditResult:
    """Object removal by curve matching (to a background pixel, or a flat pseudo-curve)."""
    return _run("remove", opts, backbone, progress)


@register("adjust-saliency", "editing", AdjustSaliencyOptions, out="out/saliency-edit", **_EDIT)
def adjust_saliency(opts: AdjustSaliencyOptions, backbone: Backbone | None = None,
                    progress: bool = False
                    ) -> CurveEditResult:
    """Saliency increase or decrease: λ1·|r|^(∓1) plus decoder feature alignment (App. D)."""
    return _run("adjust-saliency", opts, backbone, progress)


@register("blend", "editing", BlendOptions, out="out/blend", **_EDIT)
def blend(opts: BlendOptions, backbone: Backbone | None = None,
          progress: bool = False) -> CurveEditResult:
    """Image blending: decrease the saliency of the seam (the mask's 3×3 boundary band)."""
    return _run("blend", opts, backbone, progress)
