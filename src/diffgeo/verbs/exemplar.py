"""``exemplar``: progressive exemplar editing (PIXELS) of a source image file (editing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffgeo.errors import InputError
from diffgeo.verbs.common import (
    backbone_for,
    base_settings,
    check_memory,
    evenly_spaced,
    prepare_image,
    result_dir,
    time_grid,
)
from diffgeo.verbs.options import Choice, ImageVerbOptions, Seeded, at_least, in_range, option
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone

FILES = ("input.png", "result.png", "composite.png", "maps.png", "masks.png", "settings.json")


class Threshold(Choice):
    linear = "linear"
    quadratic = "quadratic"
    cubic = "cubic"
    log1p = "log1p"
    sigmoid = "sigmoid"


def placement(raw: Any, name: str) -> tuple[int, int, float]:
    """``"row,col[,scale]"`` or ``[row, col(, scale)]``."""
    parts = list(raw) if isinstance(raw, (list, tuple)) else str(raw).split(",")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else 1.0
    except (TypeError, ValueError):
        raise InputError(f"{name} must be row,col or row,col,scale, got {raw!r}") from None


@dataclass(frozen=True, kw_only=True)
class ExemplarOptions(ImageVerbOptions, Seeded):
    source: Path = option(help="Source image to edit.", argument=True)
    exemplar: tuple[Path, ...] = option((), "Exemplar image (repeatable; fitted like the "
                                        "source unless --place is given).")
    map: tuple[Path, ...] = option((), "Edit map for the exemplar of the same position "
                                   "(repeatable), drawn on the source: white/1 = keep the "
                                   "source, black/0 = take the exemplar, grey in between.")
    strength: float = option(0.8, "Maximum denoising strength t_ds^max in (0, 1]: as in "
                             "diffusers' img2img, int(steps·strength) steps are run.",
                             check=in_range(0, 1))
    threshold: Threshold = option(Threshold.linear, "Threshold over the executed steps: "
                                  "linear, quadratic, cubic, log1p or sigmoid.")
    guidance_scale: float = option(1.0, "Classifier-free guidance scale (conditional models; "
                                   "1 = off).", check=at_least(1))
    invert_maps: bool = option(False, "Maps use the opposite polarity (1 = take the "
                               "exemplar).")
    iterative: bool = option(False, "One exemplar per pass, feeding each output back as the "
                             "next source (default: all in one pass; where maps overlap the "
                             "last exemplar wins).")
    place: tuple[tuple[int, int, float], ...] = option(
        (), "row,col[,scale]: paste the exemplar of the same position (native size, scaled by "
        "scale) with its top-left corner at this model pixel of the fitted source (give once "
        "per --exemplar).", parse=placement)

    def validate(self) -> None:
        super().validate()
        if not self.exemplar:
            raise InputError("give at least one --exemplar (with its --map)")
        if len(self.map) != len(self.exemplar):
            raise InputError(f"give one --map per --exemplar: {len(self.exemplar)} "
                             f"exemplar(s), {len(self.map)} map(s)")
        if self.place and len(self.place) != len(self.exemplar):
            raise InputError(f"give --place once per --exemplar ({len(self.exemplar)}) or not "
                             f"at all, got {len(self.place)}")


def composite(source: torch.Tensor, exemplars: Sequence[torch.Tensor], maps: Sequence[Any],
              threshold: float, invert_maps: bool = False) -> torch.Tensor:
    """The copy-paste composite in image space: what the first step's pin mask copies (a map
    value above the first threshold keeps the source; later exemplars win where maps
    overlap)."""
    out = source
    for e, m in zip(exemplars, maps, strict=True):
        m = torch.as_tensor(m).to(source)
        keep = ((1 - m) if invert_maps else m) > threshold
        out = torch.where(keep, out, e)
    return out


@dataclass
class ExemplarResult(Result):
    image: torch.Tensor | None = None  # the result, (1, C, H, W) in [-1, 1]
    composite: torch.Tensor | None = None
    passes: list[Any] | None = None  # editing.pixels.PixelsResult, one per pass

    def report(self) -> list[str]:
        s = self.settings
        return [f"edited from t={s['t_start']} over {len(s['executed_timesteps'])} steps "
                f"({len(s['exemplars'])} exemplar(s), threshold {s['threshold']})"]


def edit(bb, source: torch.Tensor, exemplars: Sequence[torch.Tensor], maps: Sequence[Any],
         opts: ExemplarOptions, grid: Any, cond=None) -> ExemplarResult:
    """PIXELS on tensors (the verb after its files are read; the demo calls it directly).
    Noise: one draw per image from ``torch.Generator().manual_seed(seed)``, source first."""
    from diffgeo.editing.pixels import PixelsConfig, pixels_edit, pixels_iterative

    uncond = bb.condition("") if opts.guidance_scale > 1 and bb.conditional else None
    gen = torch.Generator().manual_seed(opts.seed)
    config = PixelsConfig(strength=opts.strength, threshold=str(opts.threshold),
                          guidance_scale=opts.guidance_scale, invert_maps=opts.invert_maps)
    kw = dict(config=config, grid=grid, cond=cond, uncond=uncond)
    with torch.no_grad():
        src_state = bb.to_state(source)
        ex_states = [bb.to_state(e) for e in exemplars]
        if opts.iterative:
            passes = pixels_iterative(bb, src_state, ex_states, maps, generator=gen, **kw)
        else:
            passes = [pixels_edit(bb, src_state, ex_states, maps, generator=gen, **kw)]
        result = bb.to_image(passes[-1].state).clamp(-1, 1)
    comp = composite(source, exemplars, maps, float(passes[0].thresholds[0]), opts.invert_maps)
    settings = base_settings("exemplar", opts, bb, grid)
    settings.update({
        "source": str(opts.source), "exemplars": [str(e) for e in opts.exemplar],
        "maps": [str(m) for m in opts.map], "strength": opts.strength,
        "num_steps": opts.steps, "threshold": str(opts.threshold), "prompt": opts.prompt,
        "guidance_scale": opts.guidance_scale, "invert_maps": opts.invert_maps,
        "iterative": opts.iterative, "seed": opts.seed,
        "t_start": passes[0].settings["t_start"], "executed_timesteps": passes[0].timesteps,
        "thresholds": [float(v) for v in passes[0].thresholds], "method": passes[0].settings,
    })
    return ExemplarResult(settings, result.float().cpu(), comp.float().cpu(), passes)


def _load_map(bb, path: Path, fit_info, k: int) -> torch.Tensor:
    """An edit map file drawn on the source image, fitted like it (padding keeps the source)."""
    from diffgeo.io import fit_tensor
    from diffgeo.io.images import mask_from_file

    m = mask_from_file(path)
    got = (int(m.shape[0]), int(m.shape[1]))
    if got != tuple(fit_info.in_size):
        raise InputError(f"--map {k + 1} ({path}) is {got[0]}x{got[1]} (HxW) but the source "
                         f"image is {fit_info.in_size[0]}x{fit_info.in_size[1]}: draw the map "
                         "on the source (same size)")
    x = torch.from_numpy(m.astype("float32"))[None, None]
    x, _ = fit_tensor(x, bb.image_size, fit_info, is_mask=True, pad_value=1.0)
    return x.clamp(0, 1)


def _write(results, bb, res: ExemplarResult, x: torch.Tensor, ex_images) -> None:
    size = tuple(bb.image_size)

    def up(m: torch.Tensor) -> torch.Tensor:
        m = torch.nn.functional.interpolate(m.float().cpu(), size=size, mode="nearest")
        return (m * 2 - 1).expand(-1, 3, -1, -1)

    results.save_image("input.png", x.float().cpu())
    for k, e in enumerate(ex_images):
        results.save_image(f"exemplar-{k + 1}.png", e.float().cpu())
    results.save_image("composite.png", res.composite)
    results.save_image("result.png", res.image)
    results.save_strip("maps.png", [up(m[None]) for m in torch.cat([p.maps for p in res.passes])])
    shown = evenly_spaced(list(res.passes[-1].masks), 10)
    results.save_strip("masks.png", [up(m[None]) for m in shown])
    results.save_json("settings.json", res.settings)


@register("exemplar", "editing", ExemplarOptions, out="out/exemplar", batchable=True,
          compared=("input.png", "result.png"))
def exemplar(opts: ExemplarOptions, backbone: Backbone | None = None,
             progress: bool = False) -> ExemplarResult:
    """PIXELS: progressive exemplar editing of SOURCE with --exemplar/--map pairs; writes the
    result, the maps as used and the per-step mask strip."""
    from diffgeo.editing.pixels import place_exemplar
    from diffgeo.io import load_image

    bb = backbone_for(opts, backbone)
    names = [*FILES, *(f"exemplar-{k + 1}.png" for k in range(len(opts.exemplar)))]
    results = result_dir(opts, names, [opts.source, *opts.exemplar, *opts.map])
    x, fit_info, cond = prepare_image(bb, opts.source, opts)
    ex_images = []
    for k, e in enumerate(opts.exemplar):
        if opts.place:
            native, _ = load_image(e)
            r, c, scale = opts.place[k]
            check_memory(opts, bb, native.numel() * scale**2 * bb.dtype.itemsize,
                         f"exemplar {k + 1} scaled by {scale:g}", "the scale of its --place")
            placed, _ = place_exemplar(native.to(device=bb.device, dtype=bb.dtype), x,
                                       offset=(r, c), scale=scale)
            ex_images.append(placed)
        else:
            img, _ = load_image(e, size=bb.image_size, fit=None if opts.fit is None
                                else str(opts.fit))
            ex_images.append(img.to(device=bb.device, dtype=bb.dtype))
    maps = [_load_map(bb, m, fit_info, k) for k, m in enumerate(opts.map)]
    res = edit(bb, x, ex_images, maps, opts, time_grid(bb, opts.steps), cond)
    res.settings.update({"fit": fit_info.to_dict(),
                         "placements": [",".join(f"{v:g}" for v in p) for p in opts.place]})
    if results is not None:
        _write(results, bb, res, x, ex_images)
    return res
