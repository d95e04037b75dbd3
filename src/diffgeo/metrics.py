"""Image-editing metrics: CLIP_dir, CLIP_sim, DINO_sim, CLIP_diff, CLIP-I, masked MSE, PSNR, SSIM.

Every metric takes batches of images (B, 3, H, W) in [-1, 1] (or image file paths, loaded with
:func:`diffgeo.io.load_image` at their own size) and returns a float64 tensor (B,) of per-image
values; a batch gives exactly what a loop over its images gives.

Definitions (generation-curves paper, App. D.1, Eq. 12-16; PIXELS, Sec. "Experiments"):

- ``clip_dir``   CLIP_dir = cos(e_cap(T), e_img(I_a) - e_img(I_b))                      (Eq. 12)
  with T the instruction describing the edit. With ``before_text`` given, the text direction
  e_cap(T) - e_cap(T_b) is used instead (the directional similarity of StyleGAN-NADA /
  InstructPix2Pix). When I_a and I_b give the same CLIP embedding the image direction is the zero
  vector and the cosine is undefined: the value is NaN, never a silent 0.
- ``clip_sim``   CLIP_sim(I1, I2) = cos(e_img(I1), e_img(I2))                            (Eq. 13)
- ``dino_sim``   DINO_sim(I1, I2) = cos(d_img(I1), d_img(I2))                            (Eq. 14)
  The paper evaluates both "over the edited region": with ``mask`` the region rule below applies
  to both images. Symmetric; 1 for identical images.
- ``clip_score`` CLIP(T, I) = cos(e_cap(T), e_img(I))                                    (Eq. 16)
- ``clip_diff``  CLIP_diff = CLIP(T, I_a) - CLIP(T, I_b)                                  (Eq. 15)
  0 for identical images, positive when the edited image matches T better.
- ``clip_i``     CLIP-I (PIXELS): cos(e_img(edited region), e_img(exemplar)); ``mask`` restricts
  the *edited* image only (the exemplar is a whole image). Without a mask it equals clip_sim.
- ``mse_inside_outside``: MSE of the difference inside / outside a mask
  (:func:`diffgeo.editing.rbe.edit_locality`, applied image by image).
- ``psnr``: :func:`image_psnr` image by image (inf for identical images).
- ``ssim``: Wang et al. (2004) SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, on [0, 1] intensities (data range 1), per channel over the "valid" region (no
  padding), averaged over channels: the same numbers as ``skimage.metrics.structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)``.

Region rule (``mask`` + ``mode``), shared with :mod:`diffgeo.perceptual` (DinoFeatures.masked):
``mode="multiply"`` is the paper's I ⊙ M (outside the mask becomes black), ``mode="crop"``
additionally crops a square box around the mask (plus ``margin``) before resizing to the
encoder's input size, so a small region fills the encoder's patches. Either way pixels outside the
mask cannot change the value. A mask is (H, W) for the whole batch, or (B, H, W) for one per image.

Models. CLIP through :class:`ClipModel` (transformers ``CLIPModel`` + tokenizer, local folder or
hub id, safetensors only; default ``openai/clip-vit-base-patch32``, since the papers cite CLIP
(Radford et al., 2021) without naming a variant); DINO through
:class:`diffgeo.perceptual.DinoFeatures` (default ``facebook/dino-vits16``, Caron et al., 2021).
Nothing is downloaded at import. LPIPS and FID need pretrained weights (AlexNet / Inception) that
diffgeo never downloads: :func:`lpips_available` and :func:`fid_available` say whether they are
usable here and why not, and :func:`lpips_distance` / :func:`fid` raise :class:`InputError` with
that reason when they are not.

Set metrics (one value for two *sets* of images, not one per image):

- ``frechet_distance``: the Fréchet distance between Gaussians fitted to two feature sets (N, D),
  FD = ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), with μ the mean and Σ the unbiased
  covariance (ddof = 1, as in pytorch_fid / numpy.cov). (Σa^½ Σb Σa^½)^½ has the same trace as the
  (Σa Σb)^½ of the usual formula and is symmetric PSD, so both square roots come from
  ``torch.linalg.eigh`` in float64 with eigenvalues below 0 (rounding) clamped to 0; the result is
  clamped at 0 for the same reason. :func:`frechet_stats` gives (μ, Σ) so a reference set's
  statistics can be cached and reused with :func:`frechet_distance_from_stats`. Each set needs
  N >= 2. With N < D the covariances are rank-deficient: the value is still defined but biased
  upwards for small N, so only compare distances computed with the same N.
- ``fd_dino``: FD of DINO CLS features (:class:`diffgeo.perceptual.DinoFeatures`, whole images):
  with a DINOv2 model at 224 px (``DinoFeatures.load("facebook/dinov2-vitl14", image_size=224)``)
  this is FD_DINOv2 (Stein et al., 2023); with the default DINO v1 model it is the same
  construction on DINO v1 features.
- ``fid``: FD of the pool3 features (2048-d) of pytorch_fid's FID InceptionV3, images resized to
  299x299 by the network; only with the pytorch_fid package and its weights already cached.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffgeo.errors import InputError, ModelNotFoundError
from diffgeo.hub import looks_like_path, snapshot
from diffgeo.io.regions import as_mask
from diffgeo.perceptual import (
    MASK_MODES,
    DinoFeatures,
    apply_mask,
    check_mask,
    mask_box,
    vision_preprocess,
)
from diffgeo.runtime import check_device, resolve_dtype

CLIP_DEFAULT = "openai/clip-vit-base-patch32"
_ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CLIP_PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors",
                  "model-*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                  "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]

ImagesLike = torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike]


# ---------------------------------------------------------------------------------- inputs
def _images(x: Any, name: str) -> torch.Tensor:
    """Tensor (B, 3, H, W) / (3, H, W) in [-1, 1], or file path(s) → float tensor (B, 3, H, W)."""
    if isinstance(x, (str, os.PathLike)):
        x = [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, (str, os.PathLike)) for p in x):
        from diffgeo.io import load_image

        loaded = [load_image(p)[0] for p in x]
        if len({tuple(t.shape) for t in loaded}) != 1:
            raise InputError(f"{name}: the image files have different sizes")
        return torch.cat(loaded)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a tensor (B, 3, H, W) in [-1, 1] or image path(s), "
                         f"got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise InputError(f"{name} must have shape (B, 3, H, W) with B >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return x.detach()


def _pair(a: Any, b: Any, na: str, nb: str) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _images(a, na), _images(b, nb)
    if ta.shape != tb.shape:
        raise InputError(f"{na} and {nb} must have the same shape, got {tuple(ta.shape)} and "
                         f"{tuple(tb.shape)}")
    return ta, tb


def _masks(mask: Any, batch: int, size: tuple[int, int]) -> list[torch.Tensor] | None:
    """None, one mask for the batch, or one per image → list of B (H, W) masks (or None)."""
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        from diffgeo.io import load_mask

        mask = load_mask(mask, size)  # drawn on the images: same size, no fitting
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if isinstance(mask, torch.Tensor):
        m = mask.detach()
        while m.ndim > 3 and m.shape[0] == 1:
            m = m[0]
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.ndim == 3 and m.shape[0] == batch and batch > 1:
            return [check_mask(mi, size) for mi in m]
    one = check_mask(mask, size)
    return [one] * batch


def _texts(texts: str | Sequence[str], batch: int, name: str) -> list[str]:
    if isinstance(texts, str):
        return [texts] * batch
    out = list(texts)
    if len(out) != batch or not all(isinstance(t, str) for t in out):
        raise InputError(f"{name} must be a string or {batch} strings (one per image)")
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine in float64; NaN where a vector is (exactly) zero."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    c = (a * b).sum(-1) / (na * nb)
    return torch.where((na == 0) | (nb == 0), torch.full_like(c, math.nan), c).cpu()


# ---------------------------------------------------------------------------------- CLIP
class ClipModel:
    """A transformers CLIP model: images in [-1, 1] → projected image embeddings, texts → text
    embeddings (not normalised; every metric uses the cosine).

    Preprocessing runs in torch: [-1, 1] → [0, 1] → antialiased bilinear resize of the whole image
    to ``vision_config.image_size`` (no centre crop: it could cut the edited region out) → CLIP
    mean/std (from ``preprocessor_config.json`` when present).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, name: str = "", batch_size: int = 16):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        p = next(model.parameters())
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device, self.dtype = p.device, p.dtype
        self.image_size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(mean, dtype=self.dtype, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=self.dtype, device=self.device).view(1, 3, 1, 1)
        self.name = name
        self.batch_size = batch_size
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike = CLIP_DEFAULT, device: str = "cpu",
             dtype: torch.dtype | str = torch.float32, *, batch_size: int = 16) -> ClipModel:
        """Load CLIPModel + tokenizer from a folder saved with save_pretrained or a hub id.

        Safetensors weights only; a hub id that cannot be fetched (offline, unknown) raises
        :class:`ModelNotFoundError` naming HF_HUB_OFFLINE and the local-folder alternative.
        """
        dtype = resolve_dtype(dtype)
        check_device(device)
        name = str(name_or_path)
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise InputError(f"CLIP model must be a folder or a hub id; {path} is a file")
        elif looks_like_path(name):
            raise ModelNotFoundError(f"CLIP model folder not found: {path}")
        else:
            path = snapshot(name, _CLIP_PATTERNS, what="CLIP model",
                            example="--clip ./clip-vit-base-patch32")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a transformers model folder: no config.json")
        if not any(p.name.endswith(".safetensors") for p in path.iterdir()):
            raise ModelNotFoundError(f"CLIP model folder {path} has no safetensors weights "
                                     "(model.safetensors)")
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
        except (ValueError, OSError, TypeError) as e:
            raise InputError(f"{path} is not a CLIP model folder ({e})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (ValueError, OSError, TypeError) as e:
            raise ModelNotFoundError(f"{path} has no usable CLIP tokenizer ({e})") from None
        mean, std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            try:
                cfg = json.loads(pre.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{pre} is not valid JSON ({e})") from None
            mean = tuple(float(v) for v in cfg.get("image_mean", mean))
            std = tuple(float(v) for v in cfg.get("image_std", std))
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise InputError(f"{pre}: image_mean/image_std must be 3 numbers (std > 0)")
        return cls(model.to(device), tokenizer, mean, std, name=name, batch_size=batch_size)

    def preprocess(self, images: torch.Tensor,
                   box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) → normalised CLIP input (B, 3, S, S); ``box`` crops first."""
        x = _images(images, "images").to(device=self.device, dtype=self.dtype)
        return vision_preprocess(x, box, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def _pixel_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in pixel_values.split(self.batch_size):
            pooled = self.model.vision_model(pixel_values=chunk).pooler_output
            out.append(self.model.visual_projection(pooled))
        return torch.cat(out)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings (B, D) of whole images in [-1, 1]."""
        return self._pixel_features(self.preprocess(images))

    def masked(self, images: torch.Tensor, mask: Any, mode: str = "multiply",
               margin: float = 0.1) -> torch.Tensor:
        """Embeddings (B, D) of the masked region (module docstring: the region rule)."""
        images = _images(images, "images")
        if mode not in MASK_MODES:
            raise InputError(f"mode must be one of {MASK_MODES}, got {mode!r}")
        m = check_mask(mask, tuple(images.shape[-2:]))
        box = mask_box(m, margin) if mode == "crop" else None
        return self._pixel_features(self.preprocess(apply_mask(images, m), box))

    @torch.no_grad()
    def text_features(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Projected CLIP text embeddings (B, D)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a string or a non-empty list of strings")
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        return self.model.text_projection(out.pooler_output)


def _region_features(encoder: ClipModel | DinoFeatures, images: torch.Tensor,
                     masks: list[torch.Tensor] | None, mode: str, margin: float) -> torch.Tensor:
    if mode not in MASK_MODES:
        raise InputError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if masks is None:
        if isinstance(encoder, ClipModel):
            return encoder.image_features(images)
        return encoder(images)
    if all(m is masks[0] for m in masks):  # one mask for the whole batch: one batched call
        return encoder.masked(images, masks[0], mode, margin)
    return torch.cat([encoder.masked(images[i:i + 1], m, mode, margin)
                      for i, m in enumerate(masks)])


# ---------------------------------------------------------------------------------- metrics
def clip_score(clip: ClipModel, images: ImagesLike, texts: str | Sequence[str], mask: Any = None,
               mode: str = "multiply", margin: float = 0.1) -> torch.Tensor:
    """CLIP(T, I) = cos(e_cap(T), e_img(I)) (Eq. 16), per image; ``texts`` one or one per image."""
    x = _images(images, "images")
    t = _texts(texts, x.shape[0], "texts")
    feats = _region_features(clip, x, _masks(mask, x.shape[0], tuple(x.shape[-2:])), mode, margin)
    return _cos(clip.text_features(t), feats)


def clip_dir(clip: ClipModel, before: ImagesLike, after: ImagesLike, text: str | Sequence[str],
             before_text: str | Sequence[str] | None = None) -> torch.Tensor:
    """CLIP_dir (Eq. 12): cos(e_cap(T), e_img(I_a) - e_img(I_b)); higher = better edit.

    ``text`` is T, the instruction describing the edit. With ``before_text`` (a caption of I_b)
    the text direction e_cap(T) - e_cap(T_b) replaces e_cap(T) (directional CLIP similarity).
    NaN where the image direction is zero (e.g. identical images): the cosine is undefined.
    """
    b, a = _pair(before, after, "before", "after")
    n = b.shape[0]
    d_img = clip.image_features(a).double() - clip.image_features(b).double()
    d_txt = clip.text_features(_texts(text, n, "text")).double()
    if before_text is not None:
        d_txt = d_txt - clip.text_features(_texts(before_text, n, "before_text")).double()
    return _cos(d_txt, d_img)


def clip_sim(clip: ClipModel, a: ImagesLike, b: ImagesLike, mask: Any = None,
             mode: str = "multiply", margin: float = 0.1) -> torch.Tensor:
    """CLIP_sim (Eq. 13): cos(e_img(I1), e_img(I2)) over the region ``mask`` (both images)."""
    x, y = _pair(a, b, "a", "b")
    masks = _masks(mask, x.shape[0], tuple(x.shape[-2:]))
    return _cos(_region_features(clip, x, masks, mode, margin),
                _region_features(clip, y, masks, mode, margin))


def dino_sim(dino: DinoFeatures, a: ImagesLike, b: ImagesLike, mask: Any = None,
             mode: str = "multiply", margin: float = 0.1) -> torch.Tensor:
    """DINO_sim (Eq. 14): cos(d_img(I1), d_img(I2)) of DINO CLS features over ``mask``."""
    x, y = _pair(a, b, "a", "b")
    masks = _masks(mask, x.shape[0], tuple(x.shape[-2:]))
    return _cos(_region_features(dino, x, masks, mode, margin),
                _region_features(dino, y, masks, mode, margin))


def clip_diff(clip: ClipModel, before: ImagesLike, after: ImagesLike,
              text: str | Sequence[str], mask: Any = None, mode: str = "multiply",
              margin: float = 0.1) -> torch.Tensor:
    """CLIP_diff (Eq. 15): CLIP(T, I_a) - CLIP(T, I_b); 0 for identical images, > 0 when the edit
    moved the image towards T. ``mask`` (optional, not in the paper) restricts both images."""
    b, a = _pair(before, after, "before", "after")
    return (clip_score(clip, a, text, mask, mode, margin)
            - clip_score(clip, b, text, mask, mode, margin))


def clip_i(clip: ClipModel, edited: ImagesLike, exemplar: ImagesLike, mask: Any = None,
           mode: str = "crop", margin: float = 0.1) -> torch.Tensor:
    """CLIP-I (PIXELS): cos(e_img(edited region), e_img(exemplar)).

    ``mask`` is the edit map of ``edited`` (the exemplar is used whole, and may have another
    size); ``mode`` defaults to "crop" so the region fills CLIP's input like the exemplar does.
    """
    x = _images(edited, "edited")
    y = _images(exemplar, "exemplar")
    if y.shape[0] == 1 and x.shape[0] > 1:
        y = y.expand(x.shape[0], -1, -1, -1)
    if y.shape[0] != x.shape[0]:
        raise InputError(f"exemplar must have 1 or {x.shape[0]} images, got {y.shape[0]}")
    masks = _masks(mask, x.shape[0], tuple(x.shape[-2:]))
    return _cos(_region_features(clip, x, masks, mode, margin), clip.image_features(y))


@dataclass
class Locality:
    """How an edit splits between the region and the rest (the paper's Fig. 7 comparison).

    ``mse_inside`` / ``mse_outside``: mean squared change over the pixels inside / outside the
    mask (weighted by a soft mask), ``ratio`` = inside / outside (higher = more local; inf when
    nothing changed outside), ``mse``: over the whole image. ``lpips``: None unless requested
    and available; ``note`` says why not.
    """

    mse_inside: float
    mse_outside: float
    ratio: float
    mse: float
    lpips: float | None = None
    note: str = ""


def _image_batch(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor image (C, H, W) or (B, C, H, W), "
                         f"got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"{name} must have shape (C, H, W) or (B, C, H, W), "
                         f"got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def edit_locality(before: torch.Tensor, after: torch.Tensor, mask: Any, *,
                  lpips: bool = False) -> Locality:
    """MSE of ``after - before`` inside vs outside ``mask`` and their ratio.

    Images (C, H, W) or (B, C, H, W) in [-1, 1], same shape; ``mask`` (H, W) (or with leading
    singleton axes) in [0, 1] at the images' resolution, 1 = region. Soft masks weight pixels.
    ``lpips=True`` adds LPIPS only if :func:`lpips_available` (the ``lpips`` package and cached
    AlexNet weights); otherwise ``lpips`` stays None and ``note`` says why — nothing is
    downloaded.
    """
    b = _image_batch(before, "before")
    a = _image_batch(after, "after")
    if b.shape != a.shape:
        raise InputError(f"before and after must have the same shape, got {tuple(b.shape)} and "
                         f"{tuple(a.shape)}")
    m = as_mask(mask, tuple(b.shape[-2:]))
    w_in = m.to(b)[None, None]
    w_out = 1 - w_in
    if float(w_in.sum()) == 0 or float(w_out.sum()) == 0:
        raise InputError("mask must have pixels both inside and outside the region")
    d2 = (a - b) ** 2
    per = d2.shape[0] * d2.shape[1]
    mse_in = float((d2 * w_in).sum() / (w_in.sum() * per))
    mse_out = float((d2 * w_out).sum() / (w_out.sum() * per))
    ratio = mse_in / mse_out if mse_out > 0 else (math.inf if mse_in > 0 else math.nan)
    note = ""
    value = None
    if lpips:
        available, note = lpips_available()
        if available:
            value = float(lpips_distance(b, a).mean())
    return Locality(mse_inside=mse_in, mse_outside=mse_out, ratio=ratio,
                    mse=float(d2.mean()), lpips=value, note=note)


def mse_inside_outside(a: ImagesLike, b: ImagesLike, mask: Any) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """(MSE inside, MSE outside) ``mask``, per image, via :func:`edit_locality` (symmetric)."""
    x, y = _pair(a, b, "a", "b")
    masks = _masks(mask, x.shape[0], tuple(x.shape[-2:]))
    if masks is None:
        raise InputError("mse_inside_outside needs a mask")
    res = [edit_locality(x[i], y[i], m) for i, m in enumerate(masks)]
    return (torch.tensor([r.mse_inside for r in res], dtype=torch.float64),
            torch.tensor([r.mse_outside for r in res], dtype=torch.float64))


def image_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
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


def psnr(a: ImagesLike, b: ImagesLike, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB per image (:func:`image_psnr`; images in [-1, 1]; inf when identical)."""
    x, y = _pair(a, b, "a", "b")
    return torch.tensor([image_psnr(x[i], y[i], data_range) for i in range(x.shape[0])],
                        dtype=torch.float64)


def _gaussian_window(window: int, sigma: float) -> torch.Tensor:
    r = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: ImagesLike, b: ImagesLike, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image (Wang et al., 2004), Gaussian window, on [0, 1] intensities.

    Each channel's SSIM map is computed over the valid region (no padding), averaged over pixels
    and channels. Images in [-1, 1] are mapped to [0, 1] (data range 1). Symmetric; 1 when equal.
    """
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise InputError(f"window must be a positive odd integer, got {window!r}")
    if not isinstance(sigma, (int, float)) or sigma <= 0:
        raise InputError(f"sigma must be positive, got {sigma!r}")
    x, y = _pair(a, b, "a", "b")
    if min(x.shape[-2:]) < window:
        raise InputError(f"images ({x.shape[-2]}x{x.shape[-1]}) are smaller than the "
                         f"{window}x{window} SSIM window")
    x = ((x.double() + 1) / 2).clamp(0, 1)
    y = ((y.double() + 1) / 2).clamp(0, 1)
    B, C, H, W = x.shape
    g = _gaussian_window(window, float(sigma))
    k = (g[:, None] * g[None, :]).to(x.device)[None, None].expand(C, 1, window, window)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, k, groups=C)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).cpu()


# ---------------------------------------------------------------------------------- LPIPS / FID
def _local_metric(metric: str, package: str, weights: str, described: str) -> tuple[bool, str]:
    """(available, reason): ``package`` and torchvision importable, ``weights`` in the torch hub
    cache — diffgeo never downloads them."""
    for pkg, why in ((package, "is not installed"),
                     ("torchvision", f"(needed by `{package}`) is not installed")):
        if importlib.util.find_spec(pkg) is None:
            return False, f"{metric} unavailable: `{pkg}` {why}"
    hub = Path(torch.hub.get_dir()) / "checkpoints" / weights
    if not hub.is_file():
        return False, (f"{metric} unavailable: its weights are not cached ({hub}); diffgeo "
                       "does not download them")
    return True, described


def lpips_available() -> tuple[bool, str]:
    """Whether LPIPS can run here without downloading: the ``lpips`` package, torchvision and
    its AlexNet weights in the torch hub cache. Returns (available, reason)."""
    return _local_metric("LPIPS", "lpips", _ALEXNET_WEIGHTS, "LPIPS (AlexNet, lpips package)")


_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def fid_available() -> tuple[bool, str]:
    """Whether FID can run here without downloading: the ``pytorch_fid`` package (whose FID
    InceptionV3 :func:`fid` uses), torchvision (which it needs) and the FID Inception weights in
    the torch hub cache. Returns (available, reason)."""
    return _local_metric("FID", "pytorch_fid", _FID_WEIGHTS,
                         f"FID (pytorch_fid InceptionV3, weights {_FID_WEIGHTS})")


@functools.lru_cache(maxsize=4)
def _lpips_model(device: str) -> torch.nn.Module:
    """The LPIPS (AlexNet) network on ``device``, loaded once; InputError when unavailable."""
    ok, reason = lpips_available()
    if not ok:
        raise InputError(reason)
    check_device(device)
    try:
        import lpips as lpips_pkg  # type: ignore[import-not-found]

        net = lpips_pkg.LPIPS(net="alex", verbose=False)
    except Exception as e:  # a broken install or corrupt weights: say so, do not crash later
        raise InputError(f"LPIPS could not be loaded ({type(e).__name__}: {e})") from None
    return net.eval().requires_grad_(False).to(device)


@functools.lru_cache(maxsize=4)
def _inception_model(device: str) -> torch.nn.Module:
    """pytorch_fid's FID InceptionV3 (pool3, 2048-d) on ``device``, loaded once from the cached
    weights; InputError when unavailable."""
    ok, reason = fid_available()
    if not ok:
        raise InputError(reason)
    check_device(device)
    try:
        from pytorch_fid.inception import InceptionV3  # type: ignore[import-not-found]

        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                          normalize_input=True)
    except Exception as e:
        raise InputError(f"the FID InceptionV3 could not be loaded ({type(e).__name__}: {e})"
                         ) from None
    return net.eval().requires_grad_(False).to(device)


def lpips_distance(a: ImagesLike, b: ImagesLike, *, device: str = "cpu",
                   batch_size: int = 16) -> torch.Tensor:
    """LPIPS (AlexNet, lpips package) per image pair (B,), float64; symmetric, 0 when equal.

    Only when :func:`lpips_available` says so; otherwise :class:`InputError` with its reason.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    x, y = _pair(a, b, "a", "b")
    net = _lpips_model(str(device))
    out = []
    with torch.no_grad():
        for xs, ys in zip(x.split(batch_size), y.split(batch_size), strict=True):
            d = net(xs.to(device=device, dtype=torch.float32),
                    ys.to(device=device, dtype=torch.float32))
            out.append(d.reshape(d.shape[0], -1).mean(1).double().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------- Fréchet distance
def _feature_matrix(x: Any, name: str) -> torch.Tensor:
    """A (N, D) tensor / array of features → float64 CPU tensor, with N >= 2 and finite."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a (N, D) tensor or array of features, "
                         f"got {type(x).__name__}")
    if x.ndim != 2:
        raise InputError(f"{name} must have shape (N, D) (one feature row per image), "
                         f"got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise InputError(f"{name} needs at least 2 feature rows to fit a covariance, "
                         f"got {x.shape[0]}")
    if x.shape[1] < 1:
        raise InputError(f"{name} has no feature dimensions (shape {tuple(x.shape)})")
    if x.is_complex() or x.dtype == torch.bool:
        raise InputError(f"{name} must hold real numbers, got {x.dtype}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return x


def frechet_stats(feats: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ (D,), Σ (D, D)) of a feature set (N, D), float64 on the CPU; Σ is the unbiased
    covariance (ddof = 1), as numpy.cov and pytorch_fid use."""
    x = _feature_matrix(feats, "feats")
    mu = x.mean(0)
    c = x - mu
    sigma = c.T @ c / (x.shape[0] - 1)
    return mu, (sigma + sigma.T) / 2


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues → 0)."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _check_stats(mu: Any, sigma: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        mu, sigma = torch.as_tensor(mu), torch.as_tensor(sigma)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{name}: the mean and covariance must be numeric arrays ({e})") from None
    if mu.is_complex() or sigma.is_complex():
        raise InputError(f"{name}: the statistics must be real, got {mu.dtype} / {sigma.dtype}")
    if mu.ndim != 1 or mu.shape[0] < 1:
        raise InputError(f"{name}: the mean must be a vector (D,), got shape {tuple(mu.shape)}")
    d = mu.shape[0]
    if tuple(sigma.shape) != (d, d):
        raise InputError(f"{name}: the covariance must be ({d}, {d}) for a mean of length {d}, "
                         f"got shape {tuple(sigma.shape)}")
    mu, sigma = mu.detach().cpu().double(), sigma.detach().cpu().double()
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise InputError(f"{name}: the statistics contain NaN or infinite values")
    return mu, sigma


def frechet_distance_from_stats(mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor,
                                sigma_b: torch.Tensor) -> float:
    """FD between N(μa, Σa) and N(μb, Σb): ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½).

    float64 eigendecompositions (no scipy); eigenvalues below 0 from rounding are clamped to 0,
    and so is the result (the distance is >= 0).
    """
    mu_a, sigma_a = _check_stats(mu_a, sigma_a, "set a")
    mu_b, sigma_b = _check_stats(mu_b, sigma_b, "set b")
    if mu_a.shape != mu_b.shape:
        raise InputError(f"the two sets have different feature sizes: {mu_a.shape[0]} and "
                         f"{mu_b.shape[0]}")
    root_a = _psd_sqrt(sigma_a)
    m = root_a @ sigma_b @ root_a
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    diff = mu_a - mu_b
    fd = float(diff @ diff + torch.trace(sigma_a) + torch.trace(sigma_b) - 2 * eig.sqrt().sum())
    return max(fd, 0.0)


def frechet_distance(feats_a: torch.Tensor | np.ndarray,
                     feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Na, D) and (Nb, D).

    Symmetric; 0 for identical sets; ‖s‖² for a set and its copy shifted by s. Each set needs
    at least 2 rows; Na and Nb may differ, D may not. See the module docstring.
    """
    a = _feature_matrix(feats_a, "feats_a")
    b = _feature_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"feats_a and feats_b must have the same feature size D, got "
                         f"{a.shape[1]} and {b.shape[1]}")
    return frechet_distance_from_stats(*frechet_stats(a), *frechet_stats(b))


_SET_CHUNK = 64


def _image_chunks(images: Any, name: str):
    """Yield (B, 3, H, W) tensors of one image set: a tensor, image path(s), or a sequence of
    paths / (3, H, W) / (B, 3, H, W) tensors whose sizes may differ (grouped by size, in order,
    at most 64 images at a time so a large set is never all in memory)."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, torch.Tensor):
        yield _images(images, name)
        return
    if not isinstance(images, (list, tuple)) or not images:
        raise InputError(f"{name} must be a tensor (B, 3, H, W) in [-1, 1] or a non-empty list "
                         f"of images (paths or tensors), got {type(images).__name__}")
    buf: list[torch.Tensor] = []
    for i, item in enumerate(images):
        if not isinstance(item, (str, os.PathLike, torch.Tensor)):
            raise InputError(f"{name}[{i}] must be an image path or tensor, "
                             f"got {type(item).__name__}")
        t = _images(item, f"{name}[{i}]")
        if buf and (t.shape[1:] != buf[0].shape[1:] or sum(len(b) for b in buf) >= _SET_CHUNK):
            yield torch.cat(buf)
            buf = []
        buf.append(t)
    if buf:
        yield torch.cat(buf)


def _set_features(encode: Any, images: Any, name: str) -> torch.Tensor:
    return torch.cat([encode(chunk).double().cpu() for chunk in _image_chunks(images, name)])


def fd_dino(dino: DinoFeatures, images_a: Any, images_b: Any) -> float:
    """FD of DINO CLS features of two image sets (FD_DINOv2 of Stein et al., 2023, with a DINOv2
    model): :func:`frechet_distance` of ``dino`` features of whole images.

    Each set is a tensor (N, 3, H, W) in [-1, 1], image path(s), or a list of paths / tensors
    (sizes may differ: every image is resized to the model's input); N >= 2 per set.
    """
    return frechet_distance(_set_features(dino, images_a, "images_a"),
                            _set_features(dino, images_b, "images_b"))


def inception_features(images: Any, *, device: str = "cpu", batch_size: int = 32) -> torch.Tensor:
    """pool3 features (N, 2048) of pytorch_fid's FID InceptionV3, float64 on the CPU; images as
    for :func:`fd_dino`. Only when :func:`fid_available`; otherwise InputError with its reason."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    net = _inception_model(str(device))

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in x.split(batch_size):
            chunk = ((chunk.to(device=device, dtype=torch.float32) + 1) / 2).clamp(0, 1)
            f = net(chunk)[0]  # (B, 2048, 1, 1); the network maps [0, 1] to its own range
            out.append(f.reshape(f.shape[0], -1))
        return torch.cat(out)

    return _set_features(encode, images, "images")


def fid(images_a: Any, images_b: Any, *, device: str = "cpu", batch_size: int = 32) -> float:
    """FID: :func:`frechet_distance` of FID InceptionV3 pool3 features of two image sets.

    Only with pytorch_fid and its cached weights (:func:`fid_available`); otherwise
    :class:`InputError` with the reason. Nothing is downloaded. Sets as for :func:`fd_dino`.
    FID is strongly biased for small sets (its covariances are 2048 x 2048): the usual
    benchmarks use thousands of images.
    """
    ok, reason = fid_available()
    if not ok:
        raise InputError(reason)
    return frechet_distance(inception_features(images_a, device=device, batch_size=batch_size),
                            inception_features(images_b, device=device, batch_size=batch_size))


__all__ = ["CLIP_DEFAULT", "ClipModel", "clip_dir", "clip_diff", "clip_i", "clip_score",
           "clip_sim", "dino_sim", "fd_dino", "fid", "fid_available", "frechet_distance",
           "frechet_distance_from_stats", "frechet_stats", "inception_features",
           "lpips_available", "lpips_distance", "mse_inside_outside", "psnr", "ssim",
           "Locality", "edit_locality", "image_psnr"]
