"""``inpaint``: the baselines object removal is judged by (editing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffgeo.verbs.common import (
    backbone_for,
    base_settings,
    prepare_image,
    region_mask,
    result_dir,
    time_grid,
)
from diffgeo.verbs.options import Choice, ImageVerbOptions, Seeded, at_least, box, option
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone


class Method(Choice):
    repaint = "repaint"
    mean_fill = "mean-fill"


@dataclass(frozen=True, kw_only=True)
class InpaintOptions(ImageVerbOptions, Seeded):
    image: Path = option(help="Image to edit.", argument=True)
    mask: Path | None = option(None, "Region mask image (white = region).")
    box: tuple[int, int, int, int] | None = option(
        None, "Rectangular region r0,c0,r1,c1 (end exclusive).", parse=box)
    method: Method = option(Method.repaint, "repaint: regenerate the region from noise with the "
                            "model (RePaint on the DDIM grid); mean-fill: the mean colour of "
                            "the rest. The baselines object removal is judged by.")
    resample: int = option(5, "RePaint resamplings per step (1 = none).", check=at_least(1))


@dataclass
class InpaintResult(Result):
    image: torch.Tensor | None = None

    def report(self) -> list[str]:
        loc = self.settings["locality"]
        return [f"{self.settings['method']}: MSE inside {loc['mse_inside']:.4g}, outside "
                f"{loc['mse_outside']:.3g}"]


@register("inpaint", "editing", InpaintOptions, out="out/inpaint", batchable=True,
          compared=("input.png", "result.png"))
def inpaint(opts: InpaintOptions, backbone: Backbone | None = None,
            progress: bool = False) -> InpaintResult:
    """Fill a region from its surroundings: the inpainting baselines for object removal."""
    from diffgeo.editing import mean_fill, repaint
    from diffgeo.metrics import edit_locality

    bb = backbone_for(opts, backbone)
    results = result_dir(opts, ("input.png", "result.png", "strip.png", "settings.json"),
                         [opts.image])
    x, fit_info, cond = prepare_image(bb, opts.image, opts)
    region = region_mask(bb, fit_info, opts.mask, opts.box)[0, 0].cpu()
    grid = time_grid(bb, opts.steps)
    with torch.no_grad():
        if opts.method is Method.repaint:
            result = repaint(bb, x, region.numpy(), grid=grid, resample=opts.resample,
                             generator=torch.Generator().manual_seed(opts.seed), cond=cond,
                             progress=progress)
        else:
            result = mean_fill(x, region.numpy())
    result = result.float().cpu()
    loc = edit_locality(x.float().cpu(), result, region)
    settings = base_settings("inpaint", opts, bb, grid)
    settings.update({
        "image": str(opts.image), "method": str(opts.method), "num_steps": opts.steps,
        "resample": opts.resample, "seed": opts.seed, "fit": fit_info.to_dict(),
        "prompt": opts.prompt, "region_pixels": int((region > 0.5).sum()),
        "locality": {"mse_inside": loc.mse_inside, "mse_outside": loc.mse_outside},
    })
    if results is not None:
        results.save_image("input.png", x.float().cpu())
        results.save_image("result.png", result)
        shown = region[None, None].expand_as(result) * 2 - 1
        results.save_strip("strip.png", [x.float().cpu(), shown, result])
        results.save_json("settings.json", settings)
    return InpaintResult(settings, result)
