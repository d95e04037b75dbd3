"""What the verbs over image files share: the backbone, the result folder, the input image, the
region, the time grid and the settings every settings.json starts with."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffgeo.backbones.base import Backbone
from diffgeo.errors import InputError
from diffgeo.io import Fit, ResultDir
from diffgeo.sampling import Grid
from diffgeo.verbs.options import DType, ImageVerbOptions, ModelOptions


def environment() -> dict[str, str]:
    import diffusers

    import diffgeo

    return {"diffgeo": diffgeo.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version()}


def backbone_for(opts: ModelOptions, backbone: Backbone | None = None) -> Backbone:
    """The options' model, or ``backbone`` when the caller already holds it (batch's cache,
    the demo); refused in half precision for a differentiating verb whoever loaded it."""
    if backbone is None:
        from diffgeo.backbones import load_backbone

        backbone = load_backbone(opts.model, **opts.load_kwargs())
    opts.check_dtype(DType(str(backbone.dtype)))
    return backbone


def result_dir(opts: ImageVerbOptions, names: Sequence[str],
               inputs: Sequence[Path | None] = ()) -> ResultDir | None:
    """The folder to write into, every file checked now: a refusal comes before any compute."""
    if opts.out is None:
        return None
    results = ResultDir(opts.out, force=opts.force, protect=[p for p in inputs if p is not None])
    for name in names:
        results.path_for(name)
    return results


def check_memory(opts: ImageVerbOptions, bb: Backbone, nbytes: float, what: str,
                 lower: str) -> None:
    """The run's largest allocation against the memory budget (``--max-memory``)."""
    from diffgeo.runtime import check_memory as check

    check(nbytes, what, lower, bb.device, opts.max_memory)


def prepare_image(bb: Backbone, image: Path, opts: ImageVerbOptions):
    """(x on the backbone's device and dtype, its Fit, the prompt's conditioning)."""
    from diffgeo.io import load_image
    from diffgeo.io.images import header_size

    hw = header_size(image)
    if hw is not None:  # decoded as float32 RGB, then fitted: about three copies at full size
        check_memory(opts, bb, 3 * 3 * 4 * hw[0] * hw[1], f"the image {image} ({hw[0]}x{hw[1]})",
                     "its size (downscale it first)")
    x, fit_info = load_image(image, size=bb.image_size,
                             fit=None if opts.fit is None else str(opts.fit))
    x = x.to(device=bb.device, dtype=bb.dtype)
    cond = bb.condition(opts.prompt) if (opts.prompt or bb.conditional) else None
    return x, fit_info, cond


def region_mask(bb: Backbone, fit_info: Fit, mask: Path | None,
                box: Sequence[int] | None) -> torch.Tensor:
    """A (1, 1, H, W) region at model resolution from --mask or --box (input-image pixels)."""
    from diffgeo.io import box_mask, fit_tensor, load_mask

    if (mask is None) == (box is None):
        raise InputError("give exactly one region: --mask FILE or --box r0,c0,r1,c1")
    if mask is not None:
        return load_mask(mask, bb.image_size, fit_info, input_size=fit_info.in_size)
    m, _ = fit_tensor(box_mask(box, fit_info.in_size), bb.image_size, fit_info, is_mask=True)
    return m


# ----------------------------------------------------------------------------- the time grid
def time_grid(bb: Backbone, steps: int) -> Grid:
    """The grid every verb passes to its method: ``steps`` steps on the model's own grid rule."""
    return Grid.for_model(bb, steps)


def base_settings(verb: str, opts: ModelOptions, bb: Backbone, grid: Grid | None = None,
                  **resolved: Any) -> dict[str, Any]:
    """The start of every settings.json: the verb, its options as resolved (``resolved``
    overrides, e.g. a t defaulted to the top of the grid; device and dtype as the backbone
    actually runs), and what ran: model, device, dtype, grid, versions."""
    from dataclasses import replace

    # a flow model's h block and embedded guidance as they ran (defaults resolved)
    for name, value in (("h_block", getattr(bb, "h_block", None)),
                        ("guidance", getattr(bb, "embedded_guidance", None))):
        if value is not None:
            resolved.setdefault(name, value)
    used = replace(opts, device=str(bb.device), dtype=DType(str(bb.dtype)), **resolved)
    s: dict[str, Any] = {"verb": verb, "options": used.to_dict(),
                         "model": bb.name or opts.model, "device": str(bb.device),
                         "dtype": str(bb.dtype), "environment": environment()}
    if grid is not None:
        s["sampling_grid"] = grid.to_dict()
    return s


def evenly_spaced(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    idx = [round(i * (len(items) - 1) / (n - 1)) for i in range(n)]
    return [items[i] for i in idx]
