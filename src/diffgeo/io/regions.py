"""Regions: masks, points and boxes in image pixels, and how each use resamples them.

A mask is a float tensor (1, 1, H, W) in [0, 1] at the model's image size, 1 marking the region
of interest; points are (row, col) in image pixels; boxes are (r0, c0, r1, c1) with r1, c1
exclusive. Every method that moves a region from the image grid to another grid takes one of
the rules below, each stated once here:

=========================  ==================================================================
use                        rule
=========================  ==================================================================
which image pixels          ``mask > 0.5`` (:func:`region_pixels`): sampling curve-matching
                            pixels, a region's curve, the RePaint hole
a region on the state grid  area average (:func:`area_resize`, ``Backbone.state_region``):
                            the fraction of each state cell the region covers (soft at latent
                            cell edges; the identity for pixel models). RBE's masked
                            Jacobian, curve matching's blends and statistics, the RePaint
                            merge
an edit map on the state    bilinear, ``align_corners=False``, no antialias
grid                        (:func:`resize_edit_map`): PIXELS' non-binary maps keep their
                            values (as its reference code)
a cell map shown on the     nearest (:func:`cells_to_image`): each state cell covers its
image                       pixels exactly
=========================  ==================================================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffgeo.errors import InputError
from diffgeo.io.images import Fit, PathLike, check_size, fit_tensor, format_size, mask_array

# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def load_mask(
    source: PathLike | np.ndarray | torch.Tensor,
    size: tuple[int, int],
    fit: str | Fit | None = None,
    *,
    input_size: tuple[int, int] | None = None,
    binary: bool = False,
    invert: bool = False,
) -> torch.Tensor:
    """Load a mask as a float tensor (1, 1, H, W) in [0, 1] at the model's ``size``.

    ``source`` is an image file (see :func:`~diffgeo.io.images.mask_from_file` for which
    channel is used), a numpy
    array (H, W) / (H, W, 1) or a tensor (H, W) / (1, H, W) / (1, 1, H, W).  Values are scaled
    by dtype (uint8 / 255, uint16 / 65535, bool -> 0/1; floats must already lie in [0, 1]).

    The mask must be drawn on the image it belongs to: it must have ``input_size`` (the size of
    that image before fitting) if given, or else ``size``.  It is then fitted exactly like the
    image (pass the same ``fit``, or the image's :class:`Fit`), so it covers the same pixels.
    ``invert`` flips the mask *before* fitting (so padding stays "outside"); ``binary``
    thresholds at 0.5 (>= 0.5 -> 1) *after* fitting.  A mask that is empty after all this raises
    InputError, since an empty region of interest would silently make an edit a no-op.
    """
    size = check_size(size)
    if isinstance(fit, Fit) and input_size is None:
        input_size = fit.in_size
    if input_size is not None:
        input_size = check_size(input_size, "input_size")

    m = mask_array(source)

    got = (int(m.shape[0]), int(m.shape[1]))
    expected = input_size or size
    if got != expected:
        if input_size is not None:
            raise InputError(
                f"mask is {format_size(got)} but the image it belongs to is "
                f"{format_size(input_size)}; draw the mask on that image (same size)"
            )
        if fit is None:
            raise InputError(
                f"mask is {format_size(got)} but the model needs {format_size(size)}; "
                f'pass fit="crop"|"pad"|"resize" (CLI: --fit) matching the image\'s fit'
            )

    if invert:
        m = 1.0 - m
    x = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    x, _ = fit_tensor(x, size, fit, is_mask=True, pad_value=0.0)
    if binary:
        x = (x >= 0.5).float()
    if not bool((x > 0).any()):
        after = " after fitting" + (" and thresholding at 0.5" if binary else "")
        raise InputError(
            f"mask is empty (all zero{after}); expected at least one pixel of the region "
            f"of interest" + (" (is --invert-mask intended?)" if invert else "")
        )
    return x


# --------------------------------------------------------------------------------------------
# Points and boxes
# --------------------------------------------------------------------------------------------

_INT = r"\s*([+-]?\d+)\s*"


def _parse_ints(text: str, n: int, name: str, form: str) -> tuple[int, ...]:
    if not isinstance(text, str):
        raise InputError(f"{name} expects text of the form {form!r}; got {text!r}")
    m = re.fullmatch(",".join([_INT] * n), text)
    if m is None:
        raise InputError(f"{name} expects {n} comma-separated integers {form!r}; got {text!r}")
    values = tuple(int(v) for v in m.groups())
    if any(v < 0 for v in values):
        raise InputError(f"{name} expects non-negative pixel coordinates {form!r}; got {text!r}")
    return values


def parse_point(text: str, name: str = "--pixel") -> tuple[int, int]:
    """Parse ``"R,C"`` into a (row, col) pair of non-negative ints."""
    r, c = _parse_ints(text, 2, name, "ROW,COL")
    return r, c


def parse_box(text: str, name: str = "--box") -> tuple[int, int, int, int]:
    """Parse ``"r0,c0,r1,c1"`` into a box; r1 and c1 are exclusive, so r0 < r1 and c0 < c1."""
    r0, c0, r1, c1 = _parse_ints(text, 4, name, "R0,C0,R1,C1")
    if not (r0 < r1 and c0 < c1):
        raise InputError(
            f"{name} expects R0 < R1 and C0 < C1 (R1, C1 exclusive) in 'R0,C0,R1,C1'; got {text!r}"
        )
    return r0, c0, r1, c1


def box_mask(box: Sequence[int], size: tuple[int, int], name: str = "--box") -> torch.Tensor:
    """Binary mask (1, 1, H, W) that is 1 inside ``box`` = (r0, c0, r1, c1), r1/c1 exclusive."""
    h, w = check_size(size)
    try:
        r0, c0, r1, c1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 4 integers (r0, c0, r1, c1); got {box!r}") from None
    if not (0 <= r0 < r1 and 0 <= c0 < c1):
        raise InputError(f"{name} expects 0 <= r0 < r1 and 0 <= c0 < c1; got {(r0, c0, r1, c1)}")
    if r1 > h or c1 > w:
        raise InputError(
            f"{name} {(r0, c0, r1, c1)} extends outside the image of {format_size((h, w))}; "
            f"expected r1 <= {h} and c1 <= {w} (r1, c1 exclusive)"
        )
    m = torch.zeros(1, 1, h, w)
    m[..., r0:r1, c0:c1] = 1.0
    return m


# --------------------------------------------------------------------------------------------
# One region, and the rule each use resamples it with
# --------------------------------------------------------------------------------------------


def as_mask(mask: Any, size: Sequence[int] | None = None, name: str = "mask", *,
            meaning: str = "1 = region") -> torch.Tensor:
    """A region given as a tensor or array of shape (H, W), (1, H, W) or (1, 1, H, W) with
    values in [0, 1] (booleans allowed), as a float64 (H, W) tensor on the CPU.

    ``size`` (H, W), when given, is the size the mask must have (the model's image size: load
    files with :func:`load_mask`, which fits them). Refused: other types, more than one channel,
    NaN/inf, values outside [0, 1] (the message says what the values mean: ``meaning``), a
    wrong size.
    """
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(
            mask.astype(np.float64) if mask.dtype == np.bool_ else mask))
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor or numpy array of shape (H, W), "
                         f"(1, H, W) or (1, 1, H, W) (load files with diffgeo.io.load_mask), "
                         f"got {type(mask).__name__}")
    m = mask.detach().cpu()
    if m.dtype == torch.bool:
        m = m.to(torch.float64)
    if not m.is_floating_point():
        raise InputError(f"{name} must hold floats in [0, 1] (or booleans), got {m.dtype}")
    if m.ndim in (3, 4) and m.shape[-3] != 1:
        raise InputError(f"{name} must have one channel, got {m.shape[-3]} "
                         f"(shape {tuple(mask.shape)})")
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or 0 in m.shape:
        raise InputError(f"{name} must have shape (H, W), (1, H, W) or (1, 1, H, W), "
                         f"got {tuple(mask.shape)}")
    m = m.to(torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    if float(m.min()) < 0 or float(m.max()) > 1:
        raise InputError(f"{name} must lie in [0, 1] ({meaning}), got values in "
                         f"[{float(m.min()):.3g}, {float(m.max()):.3g}]")
    if size is not None and tuple(m.shape) != tuple(size):
        raise InputError(f"{name} is {format_size(tuple(m.shape))} but the model's images are "
                         f"{format_size(tuple(size))}: draw it on the (fitted) image "
                         "(diffgeo.io.load_mask fits it)")
    return m


def region_pixels(mask: Any, size: Sequence[int] | None = None,
                  name: str = "region") -> np.ndarray:
    """(P, 2) image pixels (row, col) of the region: where the mask is > 0.5."""
    px = np.argwhere(as_mask(mask, size, name).numpy() > 0.5)
    if len(px) == 0:
        raise InputError(f"{name} is empty: mark the pixels to edit with 1")
    return px


def area_resize(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(1, 1, H, W) -> (1, 1, h, w) by area averaging: each target cell holds the fraction of
    it that the region covers (the identity when the sizes agree)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


def resize_edit_map(m: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(1, 1, H, W) -> (1, 1, h, w) bilinearly (``align_corners=False``, no antialias): a
    non-binary edit map keeps its values' shape (the PIXELS reference code's rule)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=False)


def cells_to_image(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (h, w) cell map shown at image resolution (nearest: each cell covers its pixels)."""
    v = values[None, None].float()
    return F.interpolate(v, size=tuple(size), mode="nearest")[0, 0]
