"""The four curve-matching tasks of the generation-curves paper (§5, App. D), as thin presets.

Each takes an image in [-1, 1] (1, C, H, W) and masks at the model's image size, and returns a
:class:`CurveMatchingResult`; ``config`` overrides any default (iterations, lr, t, mode...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.editing.curve_matching import (
    CurveMatchingConfig,
    CurveMatchingResult,
    curve_matching,
)
from diffgeo.errors import InputError

DIRECTIONS = ("increase", "decrease")


def _config(config: CurveMatchingConfig | None, *, iterations: int | None = None,
            **task: Any) -> CurveMatchingConfig:
    """The caller's config with the task's loss settings, and the task's iteration budget
    where the config names none."""
    cfg = replace(config or CurveMatchingConfig(), **task)
    if cfg.iterations is None and iterations is not None:
        cfg = replace(cfg, iterations=iterations)
    return cfg


def transfer(backbone: Backbone, image: torch.Tensor, region: Any,
             reference_point: Sequence[int], config: CurveMatchingConfig | None = None,
             cond: Conditioning | None = None, progress: bool = False) -> CurveMatchingResult:
    """Semantic transfer: the region's curves are matched to the reference pixel's curve."""
    return curve_matching(backbone, image, region, _config(config, loss="match"),
                          reference_pixel=reference_point, cond=cond, progress=progress)


def remove(backbone: Backbone, image: torch.Tensor, object_mask: Any,
           reference_point: Sequence[int] | None = None,
           config: CurveMatchingConfig | None = None, cond: Conditioning | None = None,
           progress: bool = False) -> CurveMatchingResult:
    """Object removal: match a background pixel's curve, or, without one, minimise the rate
    (the pseudo-curve for uniform backgrounds)."""
    loss = "match" if reference_point is not None else "minimize"
    return curve_matching(backbone, image, object_mask, _config(config, loss=loss),
                          reference_pixel=reference_point, cond=cond, progress=progress)


def saliency(backbone: Backbone, image: torch.Tensor, region: Any, direction: str,
             config: CurveMatchingConfig | None = None, cond: Conditioning | None = None,
             progress: bool = False) -> CurveMatchingResult:
    """Saliency increase/decrease: λ1·r^λ2 (λ2 = −1 / +1) plus decoder feature alignment,
    70 iterations by default (App. D)."""
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    lam2 = -1.0 if direction == "increase" else 1.0
    cfg = _config(config, loss="saliency", lambda2=lam2, iterations=70)
    return curve_matching(backbone, image, region, cfg, cond=cond, progress=progress)


def boundary_band(mask: Any) -> np.ndarray:
    """The seam of a pasted foreground: the mask dilated minus the mask eroded (3×3 kernel)."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32)).squeeze()
    if m.ndim != 2:
        raise InputError(f"foreground mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    b = (m > 0.5).float()[None, None]
    dil = F.max_pool2d(b, 3, stride=1, padding=1)
    ero = 1 - F.max_pool2d(1 - b, 3, stride=1, padding=1)
    band = (dil - ero)[0, 0].numpy()
    if band.sum() == 0:
        raise InputError("the foreground mask has no boundary inside the image")
    return band


def blend(backbone: Backbone, composite: torch.Tensor, foreground_mask: Any,
          config: CurveMatchingConfig | None = None, cond: Conditioning | None = None,
          progress: bool = False) -> CurveMatchingResult:
    """Image blending: the saliency decrease on the seam band, 100 iterations by default."""
    band = boundary_band(foreground_mask)
    cfg = _config(config, loss="saliency", lambda2=1.0, iterations=100)
    return curve_matching(backbone, composite, band, cfg, cond=cond, progress=progress)
