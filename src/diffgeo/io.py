"""Loading and validating images, masks, points and boxes, and writing results.

Conventions used everywhere in diffgeo (see the design doc):

* images are float32 tensors in [-1, 1] of shape (B, C, H, W);
* masks are float tensors in [0, 1] of shape (1, 1, H, W), where 1 marks the region of interest;
* points are (row, col) in image pixels; boxes are (r0, c0, r1, c1) with r1, c1 exclusive.

Bringing an input to the model's size is always explicit: when the sizes differ the caller must
choose ``fit="crop"``, ``"pad"`` or ``"resize"`` (CLI: ``--fit``), and the returned :class:`Fit`
records the mapping so that points and masks drawn on the input land on the same model pixels.
Aspect ratio is only ever changed by ``"resize"``, i.e. when the user asks for it.

Every problem with user input raises :class:`~diffgeo.errors.InputError` whose message names the
argument, what was expected and what was given; raw PIL / torch errors never escape for bad input.
Results are written through :class:`ResultDir`, which refuses to overwrite existing files unless
forced, never overwrites the user's inputs, and writes every file atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io as _io
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from diffgeo.errors import InputError, OutputExistsError

__all__ = [
    "FIT_MODES",
    "Fit",
    "ResultDir",
    "box_mask",
    "fit_tensor",
    "image_from_array",
    "load_image",
    "load_images",
    "load_mask",
    "parse_box",
    "parse_point",
    "psnr",
    "to_jsonable",
    "to_uint8",
    "validate_point",
]

FIT_MODES: tuple[str, ...] = ("crop", "pad", "resize")
"""How an input of another size is brought to the model's size (CLI: ``--fit``)."""

#: ITU-R BT.601 luma weights, the same ones PIL uses for ``convert("L")``.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: Tensors / arrays with at most this many elements are written to JSON in full.
_JSON_MAX_ELEMENTS = 1024

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Small validators
# --------------------------------------------------------------------------------------------


def _fmt_size(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]} (HxW)"


def _check_size(size: Any, name: str = "size") -> tuple[int, int]:
    """Return ``size`` as ``(H, W)`` of positive ints, or raise InputError naming ``name``."""
    try:
        h, w = size
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok or h <= 0 or w <= 0:
        raise InputError(f"{name} must be a pair (H, W) of positive integers; got {size!r}")
    return int(h), int(w)


def _check_fit_mode(fit: str, name: str = "fit") -> str:
    if fit not in FIT_MODES:
        choices = "|".join(FIT_MODES)
        raise InputError(f"{name} must be one of {choices} (CLI: --fit); got {fit!r}")
    return fit


# --------------------------------------------------------------------------------------------
# Fit: mapping an input of one size onto the model's size
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """How an input of size ``in_size`` = (H_in, W_in) was mapped onto ``out_size`` = (H, W).

    The input is scaled by ``(scale_y, scale_x)`` and then shifted by ``(offset_y, offset_x)``
    model pixels (negative for a crop, positive for padding).  With pixel centres at half-integer
    positions (the convention of ``torch.nn.functional.interpolate`` with
    ``align_corners=False``) an input pixel (r, c) lands on model pixel coordinates::

        r_out = (r + 0.5) * scale_y + offset_y - 0.5
        c_out = (c + 0.5) * scale_x + offset_x - 0.5

    ``mode`` is one of :data:`FIT_MODES`, or ``"none"`` when the sizes already agreed.
    The scales are the *actual* ratios scaled_size / in_size (after rounding to whole pixels),
    so the mapping is exact for the resampling grid, not just approximately right.
    """

    mode: str
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    scale_y: float = 1.0
    scale_x: float = 1.0
    offset_y: float = 0.0
    offset_x: float = 0.0

    @classmethod
    def identity(cls, size: tuple[int, int]) -> Fit:
        """The Fit of an input that already has the model's size."""
        size = _check_size(size)
        return cls("none", size, size)

    def map_point(self, point: Sequence[float]) -> tuple[float, float]:
        """Input pixel coordinates (row, col) -> model pixel coordinates (row, col)."""
        r, c = point
        return (
            (r + 0.5) * self.scale_y + self.offset_y - 0.5,
            (c + 0.5) * self.scale_x + self.offset_x - 0.5,
        )

    def unmap_point(self, point: Sequence[float]) -> tuple[float, float]:
        """Model pixel coordinates (row, col) -> input pixel coordinates; inverse of map_point."""
        r, c = point
        return (
            (r + 0.5 - self.offset_y) / self.scale_y - 0.5,
            (c + 0.5 - self.offset_x) / self.scale_x - 0.5,
        )

    def map_pixel(self, point: Sequence[int], name: str = "--pixel") -> tuple[int, int]:
        """Map an input pixel to the nearest model pixel, refusing one that the fit cut away.

        With ``fit="crop"`` part of the input is not seen by the model; a point there cannot be
        used, so this raises InputError naming ``name`` instead of silently clamping it.
        """
        validate_point(point, self.in_size, name=name)
        r, c = self.map_point(point)
        ri, ci = int(math.floor(r + 0.5)), int(math.floor(c + 0.5))
        h, w = self.out_size
        if not (0 <= ri < h and 0 <= ci < w):
            raise InputError(
                f"{name} {tuple(point)} lies outside the part of the input the model sees "
                f"(fit={self.mode}: input {_fmt_size(self.in_size)} -> model "
                f"{_fmt_size(self.out_size)}, it maps to ({r:.1f}, {c:.1f})); "
                f"choose a point nearer the centre or use --fit pad"
            )
        return ri, ci

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, e.g. to record in a run's summary."""
        return {
            "mode": self.mode,
            "in_size": list(self.in_size),
            "out_size": list(self.out_size),
            "scale_y": self.scale_y,
            "scale_x": self.scale_x,
            "offset_y": self.offset_y,
            "offset_x": self.offset_x,
        }


def _plan_fit(
    in_size: tuple[int, int], out_size: tuple[int, int], mode: str
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Scaled size and (top, bottom, left, right) margins for ``mode``.

    Margins are positive for padding and negative for cropping.
    """
    (hi, wi), (ho, wo) = in_size, out_size
    if mode == "resize":
        return (ho, wo), (0, 0, 0, 0)
    if mode == "crop":
        # Scale so the shorter side (relative to the target) matches, then cut the excess.
        s = max(ho / hi, wo / wi)
        hs, ws = max(ho, round(hi * s)), max(wo, round(wi * s))
    else:  # pad
        # Scale so the longer side (relative to the target) matches, then fill the rest.
        s = min(ho / hi, wo / wi)
        hs, ws = min(ho, max(1, round(hi * s))), min(wo, max(1, round(wi * s)))
    dh, dw = ho - hs, wo - ws  # >= 0 for pad, <= 0 for crop
    top, left = (dh // 2, dw // 2) if mode == "pad" else (-((-dh) // 2), -((-dw) // 2))
    return (hs, ws), (top, dh - top, left, dw - left)


def fit_tensor(
    x: torch.Tensor,
    size: tuple[int, int],
    fit: str | Fit | None,
    *,
    is_mask: bool = False,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, Fit]:
    """Bring ``x`` (B, C, H_in, W_in) to ``size`` = (H, W) and return it with its :class:`Fit`.

    Rules (never a silent aspect change):

    * ``"crop"``: scale so the *shorter* side matches, then centre-crop the longer one;
    * ``"pad"``: scale so the *longer* side matches, then centre-pad with ``pad_value``
      (0.0 = mid-grey for images in [-1, 1]; 0 = "outside the region" for masks);
    * ``"resize"``: scale each axis independently (the aspect ratio may change).

    Images are resampled bicubically with antialiasing and clamped to [-1, 1]; masks
    (``is_mask=True``) bilinearly with antialiasing (an area average when shrinking) and
    clamped to [0, 1].  If the sizes already agree the tensor is returned unchanged with an
    identity Fit.  If they differ and ``fit`` is None, InputError tells the caller to choose.
    ``fit`` may also be a :class:`Fit` returned earlier, to apply the same mapping again (e.g. to
    a mask drawn on the image); its sizes must then match.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"fit_tensor expects a tensor of shape (B, C, H, W); got {shape}")
    size = _check_size(size)
    in_size = (int(x.shape[-2]), int(x.shape[-1]))
    what = "mask" if is_mask else "image"
    if isinstance(fit, Fit):
        if fit.in_size != in_size or fit.out_size != size:
            raise InputError(
                f"the given Fit maps {_fmt_size(fit.in_size)} -> {_fmt_size(fit.out_size)}, but "
                f"the {what} is {_fmt_size(in_size)} and the target {_fmt_size(size)}"
            )
        fit = None if fit.mode == "none" else fit.mode
    if fit is not None:
        _check_fit_mode(fit)
    if in_size == size:
        return x, Fit.identity(size)
    if fit is None:
        raise InputError(
            f"{what} is {_fmt_size(in_size)} but the model needs {_fmt_size(size)}; "
            f'pass fit="crop"|"pad"|"resize" (CLI: --fit crop|pad|resize) to say how to fit it'
        )
    mode = fit
    (hs, ws), (top, bottom, left, right) = _plan_fit(in_size, size, mode)

    y = x.float()
    if (hs, ws) != in_size:
        interp = "bilinear" if is_mask else "bicubic"
        y = F.interpolate(y, size=(hs, ws), mode=interp, align_corners=False, antialias=True)
    y = y.clamp(0.0, 1.0) if is_mask else y.clamp(-1.0, 1.0)
    if mode == "pad":
        y = F.pad(y, (left, right, top, bottom), value=float(pad_value))
    elif mode == "crop":
        y = y[..., -top : -top + size[0], -left : -left + size[1]]
    y = y.to(x.dtype) if x.dtype.is_floating_point else y

    result = Fit(
        mode=mode,
        in_size=in_size,
        out_size=size,
        scale_y=hs / in_size[0],
        scale_x=ws / in_size[1],
        offset_y=float(top),
        offset_x=float(left),
    )
    return y.contiguous(), result


# --------------------------------------------------------------------------------------------
# Arrays <-> tensors
# --------------------------------------------------------------------------------------------


def _unit_from_array(arr: np.ndarray, name: str) -> np.ndarray:
    """Scale an array to float32 in [0, 1] by the rule of its dtype.

    uint8 / 255, uint16 / 65535, bool -> 0/1, floats must already lie in [0, 1]; other
    integer types are accepted only when every value is 0 or 1 (a 0/1 mask).
    """
    arr = np.asarray(arr)
    if arr.size == 0:
        raise InputError(f"{name} must not be empty; got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if np.isnan(out).any():
            raise InputError(f"{name} contains NaN values; expected numbers in [0, 1]")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"{name} values must lie in [0, 1] for a float array; got min {lo:g}, max {hi:g}"
            )
        return out
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 1:
            return arr.astype(np.float32)
        raise InputError(
            f"{name} of dtype {arr.dtype} must hold only 0 and 1 (got min {lo}, max {hi}); "
            f"use uint8 (0..255), uint16 (0..65535) or floats in [0, 1]"
        )
    raise InputError(f"{name} must be a uint8, uint16, bool or float array; got dtype {arr.dtype}")


def _tensor_to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    if x.dtype.is_floating_point and x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.float()  # bfloat16 etc. have no numpy counterpart
    return x.numpy()


def image_from_array(arr: np.ndarray, *, name: str = "image") -> torch.Tensor:
    """Convert a numpy image (H, W) or (H, W, C) to a tensor (1, C, H, W) in [-1, 1].

    Values are scaled by dtype: uint8 / 255, uint16 / 65535, bool -> 0/1, floats must already lie
    in [0, 1].  Channels are kept as given (no compositing or colour conversion).
    """
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] < 1:
        raise InputError(f"{name} must have shape (H, W) or (H, W, C); got {arr.shape}")
    unit = _unit_from_array(arr, name)
    t = torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1)))[None]
    return t * 2.0 - 1.0


def to_uint8(x: torch.Tensor, index: int | None = None) -> np.ndarray:
    """Convert one image in [-1, 1], (1, C, H, W) or (C, H, W), to a uint8 array (H, W, C).

    For a batch with B > 1 pass ``index`` to pick the image.  Values outside [-1, 1] are
    clipped; NaN raises InputError (it would otherwise become an arbitrary colour).
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"image must be a torch tensor; got {type(x).__name__}")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise InputError(f"image must have shape (B, C, H, W) or (C, H, W); got {tuple(x.shape)}")
    if index is None:
        if x.shape[0] != 1:
            raise InputError(
                f"image batch has {x.shape[0]} images; pass index= to choose one to convert"
            )
        index = 0
    if not -x.shape[0] <= index < x.shape[0]:
        raise InputError(f"index {index} is out of range for a batch of {x.shape[0]} images")
    img = x[index].detach().cpu().float()
    if torch.isnan(img).any():
        raise InputError("image contains NaN values; cannot convert it to 8-bit")
    u8 = ((img.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u8.permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------------
# Reading image files
# --------------------------------------------------------------------------------------------

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open_image(path: PathLike, name: str) -> Image.Image:
    """Open and decode an image file with EXIF orientation applied; InputError on failure."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            out = ImageOps.exif_transpose(img)
            if out is img:
                out = img.copy()
    except FileNotFoundError:
        raise InputError(f"{name} file not found: {p}") from None
    except IsADirectoryError:
        raise InputError(f"{name} path is a folder, not an image file: {p}") from None
    except PermissionError:
        raise InputError(f"{name} file is not readable (permission denied): {p}") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{name} is too large to load safely: {p} ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        detail = str(e) or type(e).__name__
        raise InputError(f"not a readable image: {p} ({detail})") from None
    return out


def _pil_to_unit(img: Image.Image, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a PIL image to (colour (H, W, 1 or 3), alpha (H, W, 1) or None), floats in [0, 1].

    8-bit data is divided by 255, 16-bit ("I;16", "I") by 65535.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        return np.clip(arr, 0.0, 1.0)[:, :, None], None
    if mode == "F":
        return _unit_from_array(np.asarray(img, dtype=np.float32), name)[:, :, None], None
    has_alpha = img.has_transparency_data
    gray = mode in ("1", "L", "LA", "La")
    target = ("LA" if gray else "RGBA") if has_alpha else ("L" if gray else "RGB")
    if mode != target:
        img = img.convert(target)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if has_alpha:
        return arr[:, :, :-1], arr[:, :, -1:]
    return arr, None


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, 1 or 3) -> (H, W, channels): replicate grey, or take RGB luminance."""
    c = arr.shape[2]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=2)
    if c == 3 and channels == 1:
        return (arr @ _LUMA)[:, :, None]
    raise InputError(f"cannot convert a {c}-channel image to {channels} channels")


def load_image(
    path: PathLike,
    size: tuple[int, int] | None = None,
    fit: str | Fit | None = None,
    *,
    channels: int = 3,
    background: float = 1.0,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, Fit]:
    """Load an image file as a tensor (1, channels, H, W) in [-1, 1], with its :class:`Fit`.

    * PNG, JPEG, WebP (and anything else PIL reads); EXIF orientation is applied first, so the
      image is upright as a viewer shows it and points given on it mean what the user sees.
    * Transparency (RGBA, LA, palette or colour-key transparency) is composited onto the constant
      ``background`` in [0, 1] (default 1.0 = white), since the model has no alpha channel.
    * ``channels=3``: grey images are replicated to RGB; ``channels=1``: RGB is converted to
      luminance (ITU-R BT.601 weights).
    * 16-bit images ("I;16", "I") are scaled by 65535, not 255, so no precision is lost.
    * ``size=None`` keeps the native size; otherwise see :func:`fit_tensor` for ``fit`` and
      ``pad_value``.
    """
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3; got {channels!r}")
    if not 0.0 <= float(background) <= 1.0:
        raise InputError(f"background must lie in [0, 1] (1.0 = white); got {background!r}")
    img = _open_image(path, "image")
    colour, alpha = _pil_to_unit(img, f"image {path}")
    if alpha is not None:
        colour = colour * alpha + float(background) * (1.0 - alpha)
    colour = _to_channels(colour, channels)
    x = torch.from_numpy(np.ascontiguousarray(colour.transpose(2, 0, 1)))[None] * 2.0 - 1.0
    x = x.clamp(-1.0, 1.0)
    if size is None:
        return x, Fit.identity((x.shape[-2], x.shape[-1]))
    return fit_tensor(x, size, fit, pad_value=pad_value)


def load_images(
    paths: Iterable[PathLike],
    size: tuple[int, int] | None = None,
    fit: str | None = None,
    *,
    channels: int = 3,
    background: float = 1.0,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, list[Fit]]:
    """Load several images into one batch (B, C, H, W) with one :class:`Fit` per image.

    All images must end up the same size: either they already are (``size=None``), or ``size``
    and ``fit`` bring each one there.
    """
    paths = list(paths)
    if not paths:
        raise InputError("images: expected at least one image path; got none")
    loaded = [
        load_image(p, size, fit, channels=channels, background=background, pad_value=pad_value)
        for p in paths
    ]
    sizes = {tuple(x.shape[-2:]) for x, _ in loaded}
    if len(sizes) > 1:
        listing = ", ".join(
            f"{p}: {_fmt_size(x.shape[-2:])}" for p, (x, _) in zip(paths, loaded, strict=True)
        )
        raise InputError(
            f"images must all have the same size to form a batch; got {listing}; "
            f"pass size= and fit= (CLI: --fit) to bring them to one size"
        )
    return torch.cat([x for x, _ in loaded]), [f for _, f in loaded]


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def _mask_from_file(path: PathLike) -> np.ndarray:
    """(H, W) float mask from an image file.

    If the image has alpha and each colour channel is constant over the image (a stencil: one
    colour, the shape given by transparency), the alpha channel is the mask.  Otherwise the
    mask is the luminance of the image composited onto black, so transparent pixels count as 0
    whatever colour they store.
    """
    img = _open_image(path, "mask")
    colour, alpha = _pil_to_unit(img, f"mask {path}")
    if alpha is not None:
        spread = colour.max(axis=(0, 1)) - colour.min(axis=(0, 1))  # per channel
        if float(spread.max()) <= 0.5 / 255.0:
            return alpha[:, :, 0]
        colour = colour * alpha
    return _to_channels(colour, 1)[:, :, 0]


def _mask_from_array(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    shape = arr.shape
    if arr.ndim == 4 and shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        if arr.shape[-1] == 1:
            arr = arr[:, :, 0]
        elif arr.shape[0] == 1:
            arr = arr[0]
        else:
            raise InputError(
                f"mask must have one channel; got an array of shape {shape} "
                f"(convert it to a single-channel (H, W) array first)"
            )
    if arr.ndim != 2:
        raise InputError(f"mask must have shape (H, W) or (H, W, 1); got an array of {shape}")
    return _unit_from_array(arr, "mask")


def _mask_from_tensor(t: torch.Tensor) -> np.ndarray:
    shape = tuple(t.shape)
    if t.dim() == 4:
        if shape[0] != 1:
            raise InputError(f"mask must be a single mask (1, 1, H, W); got a batch of {shape}")
        t = t[0]
    if t.dim() == 3:
        if t.shape[0] != 1:
            raise InputError(
                f"mask must have one channel; got a tensor of shape {shape} with {t.shape[0]}"
            )
        t = t[0]
    if t.dim() != 2:
        raise InputError(
            f"mask must have shape (H, W), (1, H, W) or (1, 1, H, W); got a tensor of {shape}"
        )
    return _unit_from_array(_tensor_to_numpy(t), "mask")


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

    ``source`` is an image file (see :func:`_mask_from_file` for which channel is used), a numpy
    array (H, W) / (H, W, 1) or a tensor (H, W) / (1, H, W) / (1, 1, H, W).  Values are scaled
    by dtype (uint8 / 255, uint16 / 65535, bool -> 0/1; floats must already lie in [0, 1]).

    The mask must be drawn on the image it belongs to: it must have ``input_size`` (the size of
    that image before fitting) if given, or else ``size``.  It is then fitted exactly like the
    image (pass the same ``fit``, or the image's :class:`Fit`), so it covers the same pixels.
    ``invert`` flips the mask *before* fitting (so padding stays "outside"); ``binary``
    thresholds at 0.5 (>= 0.5 -> 1) *after* fitting.  A mask that is empty after all this raises
    InputError, since an empty region of interest would silently make an edit a no-op.
    """
    size = _check_size(size)
    if isinstance(fit, Fit) and input_size is None:
        input_size = fit.in_size
    if input_size is not None:
        input_size = _check_size(input_size, "input_size")

    if isinstance(source, torch.Tensor):
        m = _mask_from_tensor(source)
    elif isinstance(source, np.ndarray):
        m = _mask_from_array(source)
    elif isinstance(source, (str, os.PathLike)):
        m = _mask_from_file(source)
    else:
        raise InputError(
            f"mask must be an image path, a numpy array or a torch tensor; "
            f"got {type(source).__name__}"
        )

    got = (int(m.shape[0]), int(m.shape[1]))
    expected = input_size or size
    if got != expected:
        if input_size is not None:
            raise InputError(
                f"mask is {_fmt_size(got)} but the image it belongs to is "
                f"{_fmt_size(input_size)}; draw the mask on that image (same size)"
            )
        if fit is None:
            raise InputError(
                f"mask is {_fmt_size(got)} but the model needs {_fmt_size(size)}; "
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


def validate_point(
    point: Sequence[int], size: tuple[int, int], name: str = "--pixel"
) -> tuple[int, int]:
    """Check that ``point`` = (row, col) lies inside an image of ``size`` = (H, W)."""
    h, w = _check_size(size)
    try:
        r, c = (int(v) for v in point)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a (row, col) pair of integers; got {point!r}") from None
    if not (0 <= r < h and 0 <= c < w):
        raise InputError(
            f"{name} ({r}, {c}) lies outside the image of {_fmt_size((h, w))}; "
            f"expected 0 <= row < {h} and 0 <= col < {w}"
        )
    return r, c


def box_mask(box: Sequence[int], size: tuple[int, int], name: str = "--box") -> torch.Tensor:
    """Binary mask (1, 1, H, W) that is 1 inside ``box`` = (r0, c0, r1, c1), r1/c1 exclusive."""
    h, w = _check_size(size)
    try:
        r0, c0, r1, c1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 4 integers (r0, c0, r1, c1); got {box!r}") from None
    if not (0 <= r0 < r1 and 0 <= c0 < c1):
        raise InputError(f"{name} expects 0 <= r0 < r1 and 0 <= c0 < c1; got {(r0, c0, r1, c1)}")
    if r1 > h or c1 > w:
        raise InputError(
            f"{name} {(r0, c0, r1, c1)} extends outside the image of {_fmt_size((h, w))}; "
            f"expected r1 <= {h} and c1 <= {w} (r1, c1 exclusive)"
        )
    m = torch.zeros(1, 1, h, w)
    m[..., r0:r1, c0:c1] = 1.0
    return m


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB between two images in [-1, 1] (``data_range`` = 2).

    Computed over all elements in float64; ``inf`` when the images are identical.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise InputError(
            f"psnr needs images of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    mse = float(((a.detach().double() - b.detach().double()) ** 2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


# --------------------------------------------------------------------------------------------
# JSON conversion
# --------------------------------------------------------------------------------------------


def _json_float(v: float) -> float | str:
    # JSON has no inf/NaN; keep the information as a string rather than writing invalid JSON.
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _array_summary(arr: np.ndarray) -> Any:
    if arr.size <= _JSON_MAX_ELEMENTS:
        return to_jsonable(arr.tolist())
    summary: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    if np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        a = arr.astype(np.float64)
        for key, fn in (("min", np.min), ("max", np.max), ("mean", np.mean)):
            summary[key] = _json_float(float(fn(a)))
    return summary


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types.

    Dataclasses -> dicts (objects with ``to_dict()`` use it), Paths -> str, tuples / sets ->
    lists, numpy scalars -> Python numbers, arrays and tensors with at most 1024 elements ->
    nested lists (larger ones -> a summary with shape, dtype, min, max, mean), torch dtype /
    device -> str, enums -> their value, inf / NaN -> "inf" / "-inf" / "nan".
    """
    if obj is None or isinstance(obj, (bool, str, int)) and not isinstance(obj, enum.Enum):
        return obj
    if isinstance(obj, float):
        return _json_float(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (os.PathLike,)):
        return os.fspath(obj)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, torch.Tensor):
        return _array_summary(_tensor_to_numpy(obj))
    if isinstance(obj, np.ndarray):
        return _array_summary(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and not isinstance(obj, type):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot convert an object of type {type(obj).__name__} to JSON: {obj!r}")


def _csv_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise InputError(f"CSV cells must be scalars; got a tensor of shape {tuple(v.shape)}")
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


# --------------------------------------------------------------------------------------------
# Result folder
# --------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def atomic_write(target: Path, writer: Callable[[IO[Any]], None], text: bool = False) -> Path:
    """Write ``target`` through a uniquely named temporary file in its folder, fsync and rename:
    readers see the old file or the whole new one, never a partial write (a crash leaves no
    temporary behind either)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        kwargs: dict[str, Any] = {"encoding": "utf-8", "newline": ""} if text else {}
        with os.fdopen(fd, "w" if text else "wb", **kwargs) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


class ResultDir:
    """A folder for a run's outputs that is safe to write into.

    * The folder is created if needed.
    * An existing file is never overwritten unless ``force=True`` (CLI: ``--force``) - except
      files this ResultDir itself wrote earlier in the same run, which it may update.
    * A path in ``protect`` (the user's input files) is never written, even with ``force``.
    * Every write goes to a temporary file in the same folder which is then renamed into place
      (atomic on POSIX and Windows), so an interrupted run never leaves a half-written file
      under the final name.
    """

    def __init__(
        self, path: PathLike, force: bool = False, protect: Iterable[PathLike] | None = None
    ) -> None:
        self.path = Path(path)
        self.force = bool(force)
        self.protect = [Path(p) for p in (protect or [])]
        self._written: set[Path] = set()
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(
                f"output folder {self.path} exists and is not a folder; choose another --out"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create output folder {self.path}: {e}") from None

    def __repr__(self) -> str:
        return f"ResultDir({str(self.path)!r}, force={self.force})"

    def path_for(self, name: str) -> Path:
        """The path ``name`` inside the folder, after checking that it may be written."""
        rel = Path(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise InputError(
                f"result name must be a relative path inside {self.path}; got {name!r}"
            )
        target = self.path / rel
        for p in self.protect:
            if _same_file(target, p):
                raise OutputExistsError(
                    f"refusing to write {target}: it is one of the input files; "
                    f"choose another output folder (--force does not override this)"
                )
        if target.exists() and not self.force and target.resolve() not in self._written:
            raise OutputExistsError(f"{target} exists; pass --force (force=True) to overwrite")
        return target

    def _write(self, name: str, writer: Callable[[IO[Any]], None], text: bool = False) -> Path:
        target = self.path_for(name)
        atomic_write(target, writer, text)
        self._written.add(target.resolve())
        return target

    @staticmethod
    def _named(name: str, suffix: str) -> str:
        s = Path(name).suffix
        if not s:
            return name + suffix
        if s.lower() != suffix:
            raise InputError(f"result name for a {suffix} file must end in {suffix}; got {name!r}")
        return name

    def save_image(self, name: str, x: torch.Tensor) -> Path:
        """Write an image in [-1, 1], (1, C, H, W) or (C, H, W) with C in {1, 3, 4}, as PNG."""
        arr = to_uint8(x)
        if arr.shape[2] not in (1, 3, 4):
            raise InputError(f"image must have 1, 3 or 4 channels to save; got {arr.shape[2]}")
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        buf = _io.BytesIO()
        img.save(buf, format="PNG")
        return self._write(self._named(name, ".png"), lambda f: f.write(buf.getvalue()))

    def save_strip(self, name: str, images: Sequence[torch.Tensor], gap: int = 2) -> Path:
        """Write images side by side (same height) with a ``gap``-pixel white band between."""
        if len(images) == 0:
            raise InputError("save_strip needs at least one image; got none")
        xs = [x[None] if x.dim() == 3 else x for x in images]
        for i, x in enumerate(xs):
            if x.dim() != 4 or x.shape[0] != 1:
                raise InputError(
                    f"save_strip image {i} must be (1, C, H, W) or (C, H, W); got "
                    f"{tuple(images[i].shape)}"
                )
        heights = {int(x.shape[-2]) for x in xs}
        if len(heights) > 1:
            raise InputError(f"save_strip images must share one height; got {sorted(heights)}")
        c = max(int(x.shape[1]) for x in xs)
        parts: list[torch.Tensor] = []
        for i, x in enumerate(xs):
            x = x.detach().cpu().float()
            if x.shape[1] != c:
                if x.shape[1] != 1:
                    raise InputError(
                        f"save_strip images must have 1 or {c} channels; image {i} has {x.shape[1]}"
                    )
                x = x.expand(-1, c, -1, -1)
            if i and gap > 0:
                parts.append(torch.ones(1, c, x.shape[-2], gap))
            parts.append(x)
        return self.save_image(name, torch.cat(parts, dim=-1))

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` (converted by :func:`to_jsonable`) as JSON, sorted keys, indent 2."""
        text = json.dumps(to_jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"
        return self._write(self._named(name, ".json"), lambda f: f.write(text), text=True)

    def save_npz(self, name: str, **arrays: Any) -> Path:
        """Write arrays (tensors are converted to numpy) into an uncompressed ``.npz``."""
        data = {
            k: _tensor_to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)
            for k, v in arrays.items()
        }
        return self._write(self._named(name, ".npz"), lambda f: np.savez(f, **data))

    def save_csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
        """Write a CSV with ``header`` and ``rows`` (each row as long as the header)."""
        header = list(header)
        table = []
        for i, row in enumerate(rows):
            row = [_csv_value(v) for v in row]
            if len(row) != len(header):
                raise InputError(
                    f"CSV row {i} has {len(row)} values but the header has {len(header)}"
                )
            table.append(row)

        def write(f: IO[str]) -> None:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(table)

        return self._write(self._named(name, ".csv"), write, text=True)
