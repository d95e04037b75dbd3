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
a region on the state grid  area average (:func:`state_region`): the fraction of each state
                            cell the region covers (soft at latent cell edges; the identity
                            for pixel models). RBE's masked Jacobian, curve matching's blends
                            and statistics, the RePaint merge
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

import numpy as np
import torch

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
