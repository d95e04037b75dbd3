"""``invert``: DDIM inversion of an image file and its regeneration (analysis)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffgeo.verbs.common import (
    backbone_for,
    base_settings,
    evenly_spaced,
    prepare_image,
    result_dir,
    time_grid,
)
from diffgeo.verbs.options import ImageVerbOptions, at_least, option, timestep
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone

FILES = ("input.png", "reconstruction.png", "trajectory.png", "trajectory.npz", "settings.json")


# No seed: inversion and DDIM (eta 0) generation draw nothing random.
@dataclass(frozen=True, kw_only=True)
class InvertOptions(ImageVerbOptions):
    image: Path = option(help="Image to invert (PNG, JPEG, WebP).", argument=True)
    t: int | float = option(700, "Timestep to invert to (on the DDIM grid; flow models: the "
                            "grid level nearest this model time sigma*T).", flags=("--t",),
                            parse=timestep)
    exact: bool = option(False, "Refine every inversion step by fixed-point iteration so that "
                         "generation maps it back exactly.")
    tol: float = option(1e-5, "Exact mode: relative round-trip tolerance per step.")
    max_iter: int = option(50, "Exact mode: iteration cap per step.", check=at_least(1))


@dataclass
class InvertResult(Result):
    image: torch.Tensor | None = None  # the input as fitted, (1, C, H, W) in [-1, 1]
    reconstruction: torch.Tensor | None = None
    trajectory: Any = None  # sampling.Trajectory of the inversion
    strip: list[torch.Tensor] | None = None
    psnr: float = float("nan")

    def report(self) -> list[str]:
        return [f"reconstruction PSNR: {self.psnr:.2f} dB  (state round trip max error "
                f"{self.settings['state_max_error']:.2e})"]

    def write(self, results) -> None:
        inv = self.trajectory
        results.save_image("input.png", self.image)
        results.save_image("reconstruction.png", self.reconstruction)
        results.save_strip("trajectory.png", self.strip)
        results.save_npz("trajectory.npz",
                         timesteps=torch.tensor([-1 if s is None else s for s in inv.timesteps]),
                         states=inv.stacked().float().cpu())
        results.save_json("settings.json", self.settings)


@register("invert", "analysis", InvertOptions, out="out/invert", batchable=True,
          compared=("input.png", "reconstruction.png"))
def invert(opts: InvertOptions, backbone: Backbone | None = None,
           progress: bool = False) -> InvertResult:
    """DDIM-invert IMAGE to X_t, regenerate it, and save the trajectory, the reconstruction and
    its PSNR."""
    from diffgeo import sampling
    from diffgeo.metrics import image_psnr as psnr

    bb = backbone_for(opts, backbone)
    results = result_dir(opts, FILES, [opts.image])
    x, fit_info, cond = prepare_image(bb, opts.image, opts)
    grid = time_grid(bb, opts.steps)
    with torch.no_grad():
        state = bb.to_state(x)
        inv = sampling.invert(bb, state, opts.t, grid, cond, exact=opts.exact, tol=opts.tol,
                          max_iter=opts.max_iter, progress=progress)
        gen = sampling.generate(bb, inv.last, opts.t, grid, cond, progress=progress)
        recon = bb.to_image(gen.last)
        ceiling = bb.to_image(state) if bb.kind == "latent" else x
        shown = evenly_spaced(list(zip(inv.timesteps, inv.states, strict=True)), 6)
        strip = [bb.to_image(s).clamp(-1, 1).float().cpu() for _, s in shown]
    xc, rc = x.float().cpu(), recon.float().cpu()
    settings = base_settings("invert", opts, bb, grid)
    settings.update({
        "image": str(opts.image), "t": opts.t, "num_steps": opts.steps, "exact": opts.exact,
        "tol": opts.tol, "max_iter": opts.max_iter, "prompt": opts.prompt,
        "fit": fit_info.to_dict(), "model_summary": bb.summary().__dict__,
        "psnr": psnr(rc, xc), "psnr_autoencoder_ceiling": psnr(ceiling.float().cpu(), xc),
        "state_max_error": float((gen.last - state).abs().max()),
        "exact_residuals": inv.residuals, "exact_iterations": inv.iterations,
        "grid": [t for t in inv.timesteps if t is not None],  # the path's levels
    })
    res = InvertResult(settings, xc, rc, inv, strip, settings["psnr"])
    if results is not None:
        res.write(results)
    return res
