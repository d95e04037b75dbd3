"""Images: decoding files and arrays, the explicit fit to the model's size, back to 8-bit.

Images in the API are float tensors in [-1, 1] of shape (B, C, H, W). Bringing an input to the
model's size is always explicit: when the sizes differ the caller must choose ``fit="crop"``,
``"pad"`` or ``"resize"`` (CLI: ``--fit``), and the returned :class:`Fit` records the mapping so
that points and masks drawn on the input land on the same model pixels. Aspect ratio is only
ever changed by ``"resize"``, i.e. when the user asks for it. Mask *files* are decoded here too
(:func:`mask_array`); what a mask means is :mod:`diffgeo.io.regions`'.

Every problem with user input raises :class:`~diffgeo.errors.InputError` whose message names the
argument, what was expected and what was given; raw PIL / torch errors never escape.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from diffgeo.errors import InputError

FIT_MODES: tuple[str, ...] = ("crop", "pad", "resize")
"""How an input of another size is brought to the model's size (CLI: ``--fit``)."""

#: ITU-R BT.601 luma weights, the same ones PIL uses for ``convert("L")``.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

PathLike = str | os.PathLike

# --------------------------------------------------------------------------------------------
# Small validators
# --------------------------------------------------------------------------------------------


def format_size(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]} (HxW)"


def check_size(size: Any, name: str = "size") -> tuple[int, int]:
    """Return ``size`` as ``(H, W)`` of positive ints, or raise InputError naming ``name``."""
    try:
        h, w = size
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok or h <= 0 or w <= 0:
        raise InputError(f"{name} must be a pair (H, W) of positive integers; got {size!r}")
    return int(h), int(w)


def check_fit_mode(fit: str, name: str = "fit") -> str:
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
        size = check_size(size)
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
                f"(fit={self.mode}: input {format_size(self.in_size)} -> model "
                f"{format_size(self.out_size)}, it maps to ({r:.1f}, {c:.1f})); "
                f"choose a point nearer the centre or use --fit pad"
            )
        return ri, ci

    def pull_back(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """A map on the model grid (``out_size``) as a map on the input's pixels (``in_size``):
        each input pixel takes the model pixel its centre lands on (nearest, the rule of
        :meth:`map_pixel`); input pixels the fit cut away get ``fill``. How a model-grid
        result (a saliency map) becomes a mask or edit map drawn on the user's image."""
        arr = np.asarray(values)
        if arr.shape[:2] != tuple(self.out_size):
            raise InputError(f"a model-grid map must be {format_size(self.out_size)} (HxW), got "
                             f"{arr.shape[0]}x{arr.shape[1]}" if arr.ndim >= 2 else
                             f"a model-grid map must be 2-D, got shape {arr.shape}")
        h, w = self.out_size
        rows = np.floor((np.arange(self.in_size[0]) + 0.5) * self.scale_y + self.offset_y)
        cols = np.floor((np.arange(self.in_size[1]) + 0.5) * self.scale_x + self.offset_x)
        rows, cols = rows.astype(np.int64), cols.astype(np.int64)
        seen = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        out = arr[np.clip(rows, 0, h - 1)][:, np.clip(cols, 0, w - 1)]
        out = out.astype(np.result_type(arr.dtype, np.float32), copy=True)
        out[~seen] = fill
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fit:
        """The inverse of :meth:`to_dict` (a fit read back from settings.json)."""
        return cls(str(data["mode"]), tuple(data["in_size"]), tuple(data["out_size"]),
                   float(data["scale_y"]), float(data["scale_x"]), float(data["offset_y"]),
                   float(data["offset_x"]))

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
    size = check_size(size)
    in_size = (int(x.shape[-2]), int(x.shape[-1]))
    what = "mask" if is_mask else "image"
    if isinstance(fit, Fit):
        if fit.in_size != in_size or fit.out_size != size:
            raise InputError(
                f"the given Fit maps {format_size(fit.in_size)} -> {format_size(fit.out_size)}, "
                f"but "
                f"the {what} is {format_size(in_size)} and the target {format_size(size)}"
            )
        fit = None if fit.mode == "none" else fit.mode
    if fit is not None:
        check_fit_mode(fit)
    if in_size == size:
        return x, Fit.identity(size)
    if fit is None:
        raise InputError(
            f"{what} is {format_size(in_size)} but the model needs {format_size(size)}; "
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


def unit_from_array(arr: np.ndarray, name: str) -> np.ndarray:
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


def tensor_to_numpy(x: torch.Tensor) -> np.ndarray:
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
    unit = unit_from_array(arr, name)
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


def open_image(path: PathLike, name: str) -> Image.Image:
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


def pil_to_unit(img: Image.Image, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a PIL image to (colour (H, W, 1 or 3), alpha (H, W, 1) or None), floats in [0, 1].

    8-bit data is divided by 255, 16-bit ("I;16", "I") by 65535.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        return np.clip(arr, 0.0, 1.0)[:, :, None], None
    if mode == "F":
        return unit_from_array(np.asarray(img, dtype=np.float32), name)[:, :, None], None
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


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, 1 or 3) -> (H, W, channels): replicate grey, or take RGB luminance."""
    c = arr.shape[2]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=2)
    if c == 3 and channels == 1:
        return (arr @ _LUMA)[:, :, None]
    raise InputError(f"cannot convert a {c}-channel image to {channels} channels")


def header_size(path: PathLike) -> tuple[int, int] | None:
    """(H, W) from the file's header without decoding the pixels; None when it cannot be read
    (:func:`open_image` then says why)."""
    try:
        with Image.open(Path(path)) as img:
            w, h = img.size
    except Exception:  # any failure is reported by the decoding that follows
        return None
    return int(h), int(w)


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
    img = open_image(path, "image")
    colour, alpha = pil_to_unit(img, f"image {path}")
    if alpha is not None:
        colour = colour * alpha + float(background) * (1.0 - alpha)
    colour = to_channels(colour, channels)
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
            f"{p}: {format_size(x.shape[-2:])}" for p, (x, _) in zip(paths, loaded, strict=True)
        )
        raise InputError(
            f"images must all have the same size to form a batch; got {listing}; "
            f"pass size= and fit= (CLI: --fit) to bring them to one size"
        )
    return torch.cat([x for x, _ in loaded]), [f for _, f in loaded]



# --------------------------------------------------------------------------------------------
# Mask files
# --------------------------------------------------------------------------------------------


def mask_from_file(path: PathLike) -> np.ndarray:
    """(H, W) float mask from an image file.

    If the image has alpha and each colour channel is constant over the image (a stencil: one
    colour, the shape given by transparency), the alpha channel is the mask.  Otherwise the
    mask is the luminance of the image composited onto black, so transparent pixels count as 0
    whatever colour they store.
    """
    img = open_image(path, "mask")
    colour, alpha = pil_to_unit(img, f"mask {path}")
    if alpha is not None:
        spread = colour.max(axis=(0, 1)) - colour.min(axis=(0, 1))  # per channel
        if float(spread.max()) <= 0.5 / 255.0:
            return alpha[:, :, 0]
        colour = colour * alpha
    return to_channels(colour, 1)[:, :, 0]


def mask_from_array(arr: np.ndarray) -> np.ndarray:
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
    return unit_from_array(arr, "mask")


def mask_from_tensor(t: torch.Tensor) -> np.ndarray:
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
    return unit_from_array(tensor_to_numpy(t), "mask")


def mask_array(source: PathLike | np.ndarray | torch.Tensor) -> np.ndarray:
    """A mask source decoded to a float (H, W) array in [0, 1], at its own size.

    ``source`` is an image file (see :func:`mask_from_file` for which channel is used), a numpy
    array (H, W) / (H, W, 1) or a tensor (H, W) / (1, H, W) / (1, 1, H, W). Values are scaled
    by dtype (uint8 / 255, uint16 / 65535, bool -> 0/1; floats must already lie in [0, 1]).
    """
    if isinstance(source, torch.Tensor):
        return mask_from_tensor(source)
    if isinstance(source, np.ndarray):
        return mask_from_array(source)
    if isinstance(source, (str, os.PathLike)):
        return mask_from_file(source)
    raise InputError(
        f"mask must be an image path, a numpy array or a torch tensor; "
        f"got {type(source).__name__}"
    )


def validate_point(
    point: Sequence[int], size: tuple[int, int], name: str = "--pixel"
) -> tuple[int, int]:
    """Check that ``point`` = (row, col) lies inside an image of ``size`` = (H, W)."""
    h, w = check_size(size)
    try:
        r, c = (int(v) for v in point)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a (row, col) pair of integers; got {point!r}") from None
    if not (0 <= r < h and 0 <= c < w):
        raise InputError(
            f"{name} ({r}, {c}) lies outside the image of {format_size((h, w))}; "
            f"expected 0 <= row < {h} and 0 <= col < {w}"
        )
    return r, c
