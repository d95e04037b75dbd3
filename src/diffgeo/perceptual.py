"""The perceptual-based generation curve (generation-curves paper, App. C.2).

The paper checks its Jacobian-based generation curve against an intuitive alternative: along a
DDIM path, predict x̂0 from every X_t (Eq. 4), decode it to an RGB image Î_t, and measure how far
it still is from the original image I *within the region M of a small object*, as the cosine
distance between DINO features (Caron et al., 2021) of Î_t ⊙ M and I ⊙ M. That distance read as a
generation state (1 = generated, 0 = not yet) gives a curve whose derivative approximates the
generation rate of the object. This module computes it so the two curves can be compared.

Definitions used here (App. C.2 leaves the normalisation implicit; Fig. 12 normalises to [0, 1]):

- distance  d(t) = 1 - cos(DINO(mask(Î_t)), DINO(mask(I)))  for every grid timestep t;
- state     s(t) = 1 - d(t) / max_t d(t)  (1 at the clean end, 0 where Î_t is furthest from I;
  all ones when max d is below ``atol``: a region the path never changes is fully generated);
- rate      r(t) = -ds/dt, by ``np.gradient`` over the (possibly non-uniform) timesteps.

Masking rule. ``mode="multiply"`` is exactly the paper's I ⊙ M: the image is multiplied by the
mask in [0, 1] intensity space, so pixels outside the mask become black (-1 in the [-1, 1]
convention) and a soft mask blends towards black. ``mode="crop"`` additionally crops to a square
box around the mask's bounding box (plus a margin) before resizing to the DINO input size: a small
object then fills the ViT's patches instead of a few of them, at the price of departing from the
paper. Either way, pixels outside the mask cannot influence the features.

Preprocessing runs in torch (no PIL round trip, no torchvision): images in [-1, 1] → [0, 1] →
bilinear resize (antialiased) of the whole image to the model's square input size → normalise with
the folder's ``preprocessor_config.json`` mean/std (ImageNet's if absent). No centre crop, unlike
the Hugging Face image processors: it could cut a small object out of the frame. Batched and
deterministic, so a curve is reproducible bit for bit on one machine.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.errors import InputError, ModelNotFoundError
from diffgeo.hub import looks_like_path, snapshot
from diffgeo.runtime import check_device, resolve_dtype
from diffgeo.sampling import Trajectory, predict_clean

DINO_DEFAULT = "facebook/dino-vits16"
"""DINO v1 ViT-S/16, the model the paper cites (Caron et al., 2021)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_MODES = ("multiply", "crop")

# What a ViT feature extractor needs from a hub repo: never TF/Flax/ONNX copies.
_HUB_PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors",
                 "model-*.safetensors", "model.safetensors.index.json"]
_HUB_PICKLE_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]



# ---------------------------------------------------------------------------------- loading
def _hub_download(repo_id: str, allow_pickle: bool) -> Path:
    """Fetch only config, preprocessor config and weights; every failure names the way out."""
    patterns = _HUB_PATTERNS + (_HUB_PICKLE_PATTERNS if allow_pickle else [])
    return snapshot(repo_id, patterns, what="DINO model", example="--perceptual ./dino-vits16")


def _resolve(name_or_path: str | os.PathLike, allow_pickle: bool) -> Path:
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"DINO model must be a folder or a hub id; {path} is a file")
        return path
    if looks_like_path(name):
        raise ModelNotFoundError(f"DINO model folder not found: {path}")
    return _hub_download(name, allow_pickle)


def _check_folder(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a transformers model folder: no config.json")
    files = {p.name for p in path.iterdir()}
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = any(f.endswith(".bin") for f in files)
    if allow_pickle and pickles:
        return
    hint = (" It has only pickle weights (.bin): pass allow_pickle=True if you trust its source, "
            "or convert them to safetensors." if pickles else "")
    raise ModelNotFoundError(f"DINO model folder {path} has no safetensors weights "
                             f"(model.safetensors).{hint}")


def _normalisation(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from preprocessor_config.json when it has them, else ImageNet's (DINO's own)."""
    pre = path / "preprocessor_config.json"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if pre.is_file():
        try:
            cfg = json.loads(pre.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{pre} is not valid JSON ({e})") from None
        m, s = cfg.get("image_mean", mean), cfg.get("image_std", std)
        if (not isinstance(m, Sequence) or not isinstance(s, Sequence) or len(m) != 3
                or len(s) != 3 or any(float(v) <= 0 for v in s)):
            raise InputError(f"{pre}: image_mean/image_std must be 3 numbers (std > 0), "
                             f"got {m!r} / {s!r}")
        mean, std = tuple(float(v) for v in m), tuple(float(v) for v in s)
    return mean, std


def vision_preprocess(x: torch.Tensor, box: tuple[int, int, int, int] | None, size: int,
                      mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images → optional crop (top, left, height, width) → [0, 1] → antialiased bilinear
    resize to size×size (once, after the crop) → normalised: the input of ViT-style encoders."""
    if box is not None:
        top, left, h, w = box
        x = x[:, :, top:top + h, left:left + w]
    x = ((x + 1) / 2).clamp(0, 1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    return (x - mean) / std


class DinoFeatures:
    """A ViT (DINO / DINOv2) seen as images in [-1, 1] → CLS features (B, D).

    The CLS token of ``last_hidden_state`` (after the final LayerNorm) is DINO's image descriptor.
    Features are not L2-normalised: the cosine distance does not need it.
    """

    def __init__(self, model: torch.nn.Module, image_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 name: str = "", batch_size: int = 16):
        if not isinstance(image_size, int) or image_size < 1:
            raise InputError(f"image_size must be a positive integer, got {image_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        p = next(model.parameters())
        self.model = model.eval().requires_grad_(False)
        self.device, self.dtype = p.device, p.dtype
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=self.dtype, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=self.dtype, device=self.device).view(1, 3, 1, 1)
        self.name = name
        self.batch_size = batch_size
        native = getattr(model.config, "image_size", image_size)
        # ViT needs to be told to interpolate its position embeddings off its native size;
        # DINOv2 always interpolates and takes no such argument.
        self._forward_kw: dict[str, Any] = {}
        if image_size != native and "interpolate_pos_encoding" in inspect.signature(
                model.forward).parameters:
            self._forward_kw["interpolate_pos_encoding"] = True

    @classmethod
    def load(cls, name_or_path: str | os.PathLike = DINO_DEFAULT, device: str = "cpu",
             dtype: torch.dtype | str = torch.float32, *, allow_pickle: bool = False,
             image_size: int | None = None, batch_size: int = 16) -> DinoFeatures:
        """Load a transformers vision backbone (local folder or hub id; safetensors only).

        ``image_size`` overrides the input resolution (default: ``config.image_size``; DINOv2's
        config says 518, its processor 224: pass 224 to match the usual DINOv2 features).
        """
        dtype = resolve_dtype(dtype)
        check_device(device)
        path = _resolve(name_or_path, allow_pickle)
        _check_folder(path, allow_pickle)
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        size = getattr(config, "image_size", None)
        if not isinstance(size, int) or getattr(config, "num_channels", 3) != 3:
            raise InputError(f"{path}: {type(config).__name__} is not an RGB vision backbone "
                             "with an integer image_size (expected e.g. a ViT or DINOv2 model)")
        model = AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=not allow_pickle)
        model = model.to(device)
        mean, std = _normalisation(path)
        return cls(model, size if image_size is None else image_size, mean, std,
                   name=str(name_or_path), batch_size=batch_size)

    # ------------------------------------------------------------------ preprocessing
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise InputError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise InputError(f"images must have shape (B, 3, H, W) with B >= 1, "
                             f"got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise InputError("images contain NaN or infinite values")
        return images

    def preprocess(self, images: torch.Tensor,
                   box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) → normalised model input (B, 3, S, S).

        ``box`` = (top, left, height, width) crops before resizing, so resizing happens once.
        """
        x = self._check_images(images).to(device=self.device, dtype=self.dtype)
        return vision_preprocess(x, box, self.image_size, self.mean, self.std)

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = [self.model(pixel_values=chunk, **self._forward_kw).last_hidden_state[:, 0]
               for chunk in pixel_values.split(self.batch_size)]
        return torch.cat(out)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """CLS features (B, D) of whole images in [-1, 1]."""
        return self._features(self.preprocess(images))

    def masked(self, images: torch.Tensor, mask: torch.Tensor | np.ndarray,
               mode: str = "multiply", margin: float = 0.1) -> torch.Tensor:
        """CLS features (B, D) of DINO(I ⊙ M): see the module docstring for the two modes."""
        images = self._check_images(images)
        m = check_mask(mask, tuple(images.shape[-2:]))
        if mode not in MASK_MODES:
            raise InputError(f"mode must be one of {MASK_MODES}, got {mode!r}")
        x = apply_mask(images, m)
        box = mask_box(m, margin) if mode == "crop" else None
        return self._features(self.preprocess(x, box))


# ---------------------------------------------------------------------------------- masks
def check_mask(mask: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A single mask (H, W) / (1, H, W) / (1, 1, H, W) in [0, 1] → float tensor (H, W).

    Empty means no pixel above 0.5, the rule :func:`diffgeo.curves.mask_component` uses, so the
    two curves the paper compares cover the same pixels.
    """
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a torch tensor or numpy array, got {type(mask).__name__}")
    m = mask.detach()
    if m.dtype == torch.bool:
        m = m.float()
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or tuple(m.shape) != tuple(size):
        raise InputError(f"mask must be {size[0]}x{size[1]} (the image's size), as (H, W), "
                         f"(1, H, W) or (1, 1, H, W); got shape {tuple(mask.shape)}")
    m = m.to(torch.float32)
    if not torch.isfinite(m).all() or float(m.min()) < 0 or float(m.max()) > 1:
        raise InputError("mask values must lie in [0, 1] (load it with diffgeo.io.load_mask)")
    if not bool((m > 0.5).any()):
        raise InputError("mask is empty: no pixel above 0.5")
    return m


def apply_mask(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """I ⊙ M in [0, 1] intensity space, returned in [-1, 1]: outside the mask is black (-1)."""
    m = mask.to(device=images.device, dtype=images.dtype)
    return (images + 1) * m - 1


def mask_box(mask: torch.Tensor, margin: float = 0.1) -> tuple[int, int, int, int]:
    """Square (top, left, height, width) around the mask's bounding box (pixels > 0.5).

    The box side is the larger bounding-box side times (1 + 2·margin), at least one pixel more on
    each side; it is shifted to stay inside the image and clipped where the image is too narrow.
    Square so that resizing to the ViT's square input does not distort the object.
    """
    if not isinstance(margin, (int, float)) or not 0 <= margin <= 1:
        raise InputError(f"margin must be a number in [0, 1], got {margin!r}")
    H, W = mask.shape
    rows = torch.nonzero((mask > 0.5).any(dim=1)).flatten()
    cols = torch.nonzero((mask > 0.5).any(dim=0)).flatten()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(r1 - r0, c1 - c0)
    side = side + 2 * max(1, int(np.ceil(margin * side)))

    def place(lo: int, hi: int, n: int) -> tuple[int, int]:
        s = min(side, n)
        start = (lo + hi - s) // 2
        start = min(max(start, 0), n - s)
        return start, s

    top, h = place(r0, r1, H)
    left, w = place(c0, c1, W)
    return top, left, h, w


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) row-wise, in float64 (float32 rounding would blur small distances)."""
    return 1 - F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


# ---------------------------------------------------------------------------------- the curve
@dataclass
class PerceptualCurve:
    """Distance, state and rate of one masked region over the grid timesteps (ascending)."""

    timesteps: torch.Tensor  # (N,) long
    distance: torch.Tensor   # (N,) float64: 1 - cos(DINO(Î_t ⊙ M), DINO(I ⊙ M))
    state: torch.Tensor      # (N,) float64 in [0, 1]: 1 - d / max d
    rate: torch.Tensor       # (N,) float64: -d state / dt
    settings: dict[str, Any] = field(default_factory=dict)


def state_from_distance(distance: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """s = 1 - d / max d; all ones when max d <= atol (nothing changes beyond rounding)."""
    d = distance.double().clamp_min(0)
    top = float(d.max())
    if top <= atol:
        return torch.ones_like(d)
    return 1 - d / top


def rate_from_state(state: torch.Tensor, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """-ds/dt by ``np.gradient`` (second order inside, first order at the ends; non-uniform t)."""
    t = np.asarray(torch.as_tensor(timesteps).cpu(), dtype=np.float64)
    s = state.detach().cpu().double().numpy()
    if len(t) < 2:
        raise InputError("a rate needs at least 2 timesteps")
    return torch.from_numpy(-np.gradient(s, t))


@torch.no_grad()
def perceptual_curve(backbone: Backbone, trajectory: Trajectory, image: torch.Tensor,
                     mask: torch.Tensor | np.ndarray, dino: DinoFeatures,
                     cond: Conditioning | None = None, mode: str = "multiply", *,
                     margin: float = 0.1, atol: float = 1e-6) -> PerceptualCurve:
    """The perceptual-based curve of App. C.2 along ``trajectory``.

    ``trajectory`` is a batch-1 DDIM path (normally ``sampling.invert`` of
    ``backbone.to_state(image)``) and ``image`` the original I in [-1, 1], (1, 3, H, W) at
    ``backbone.image_size``. At every grid
    timestep x̂0 = predict_x0(X_t) is decoded to Î_t (clamped to [-1, 1]); DINO runs on masked
    images in batches of ``dino.batch_size``. The clean level of the trajectory is not a curve
    point: its distance is 0 by construction.
    """
    H, W = backbone.image_size
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != (1, 3, H, W):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"image must have shape (1, 3, {H}, {W}), got {got}")
    if mode not in MASK_MODES:
        raise InputError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    m = check_mask(mask, (H, W))
    grid = sorted(trajectory.noisy_timesteps())
    if len(grid) < 2:
        raise InputError(f"the trajectory needs at least 2 grid timesteps, got {grid}")
    batch = trajectory.at(grid[0]).shape[0]
    if batch != 1:
        raise InputError(f"the trajectory must have batch size 1, got {batch}")

    ref = dino.masked(image, m, mode, margin)
    dists: list[torch.Tensor] = []
    def x0_image(t: int) -> torch.Tensor:
        x = trajectory.at(t)
        x0 = predict_clean(backbone, x, t, trajectory.grid, cond)
        return backbone.to_image(x0).clamp(-1, 1)

    for start in range(0, len(grid), dino.batch_size):
        chunk = grid[start:start + dino.batch_size]
        decoded = [x0_image(t) for t in chunk]
        feats = dino.masked(torch.cat(decoded), m, mode, margin)
        dists.append(cosine_distance(feats, ref.expand_as(feats)).cpu())
    distance = torch.cat(dists)
    state = state_from_distance(distance, atol)
    timesteps = torch.tensor(grid, dtype=torch.long)
    settings = dict(model=dino.name, mode=mode, margin=margin, atol=atol,
                    image_size=dino.image_size, trajectory=dict(trajectory.settings))
    return PerceptualCurve(timesteps, distance, state, rate_from_state(state, timesteps), settings)
