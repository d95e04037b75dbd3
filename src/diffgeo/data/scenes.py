"""Synthetic scenes with ground truth: a cut-out object composited onto a background.

Every scene keeps its parts (background, object colours, object alpha), so object removal has an
exact answer (the background), saliency has one (the object is the salient region) and blending has
one (the seam is the mask boundary). The composite is *defined* from the quantised parts,

    composite = alpha * object + (1 - alpha) * background      (float32, values in [0, 1])

so the parts recompose into it exactly, also after a save/load round trip.

Sources (all offline; see ``SOURCES`` for licences):
- objects: Noto Color Emoji glyphs (Debian ``fonts-noto-color-emoji``, SIL OFL 1.1) when the font is
  installed, else procedural shapes (always available, used in tests and as a fallback);
  or any folder of RGBA PNGs (e.g. Debian ``openclipart-png``, public domain).
- backgrounds: random crops of scikit-image's bundled photos and textures, scikit-learn's sample
  images, plain colour fields and linear gradients.

Splits draw from disjoint seed streams (``SPLIT_KEYS``), so the held-out scenes are new
compositions (new crops, placements, colours) of the same object vocabulary.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffgeo.errors import InputError

SOURCES = {
    "noto-color-emoji": "Noto Color Emoji glyphs, Google, SIL Open Font License 1.1 "
    "(Debian package fonts-noto-color-emoji)",
    "scikit-image": "scikit-image bundled data (grass, gravel, brick: public domain textures; "
    "coffee, chelsea, astronaut, rocket: CC0 / public domain, see skimage.data docs)",
    "scikit-learn": "scikit-learn load_sample_images (china.jpg, flower.jpg: CC BY 2.0 / public "
    "domain per sklearn docs)",
    "procedural": "plain fields, gradients and shapes drawn by diffgeo (no licence needed)",
}

# Distinct silhouettes and colours, so a small model can learn them at 32x32.
EMOJI = (
    "\U0001f34e\U0001f34a\U0001f34b\U0001f34c\U0001f349\U0001f347\U0001f353\U0001f352\U0001f351"
    "\U0001f95d\U0001f34d\U0001f951\U0001f346\U0001f955\U0001f33d\U0001f966\U0001f344"
    "\U0001f436\U0001f431\U0001f430\U0001f98a\U0001f43b\U0001f43c\U0001f42f\U0001f981\U0001f42e"
    "\U0001f437\U0001f438\U0001f435\U0001f414\U0001f427\U0001f424\U0001f989\U0001f984\U0001f41d"
    "\U0001f98b\U0001f41e\U0001f422\U0001f419\U0001f980\U0001f420\U0001f42c\U0001f433"
    "\u26bd\U0001f3c0\U0001f3c8\U0001f3be\U0001f697\U0001f695\U0001f68c\U0001f692\U0001f680"
    "\U0001f3e0\U0001f332\U0001f335\U0001f33b\U0001f339\U0001f341\u2b50\U0001f319\u2764"
    "\U0001f48e\U0001f388\U0001f381\U0001f451\U0001f3b8\U0001f4a1\U0001f511\u23f0\u2602"
)

EMOJI_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/System/Library/Fonts/Apple Color Emoji.ttc",
)

SPLIT_KEYS = {"train": 0, "heldout": 1, "fixture": 2}


@dataclass(frozen=True)
class Scene:
    """A composite with its parts: float32 in [0, 1], images (H, W, 3), alpha (H, W)."""

    background: np.ndarray
    object_rgb: np.ndarray
    alpha: np.ndarray
    object_name: str = ""
    background_name: str = ""

    @property
    def composite(self) -> np.ndarray:
        a = self.alpha[..., None]
        return (a * self.object_rgb + (1.0 - a) * self.background).astype(np.float32)

    @property
    def mask(self) -> np.ndarray:
        """Binary object mask (alpha > 0.5): the salient region and the region to remove."""
        return (self.alpha > 0.5).astype(np.float32)

    @property
    def size(self) -> tuple[int, int]:
        return self.alpha.shape[0], self.alpha.shape[1]


@dataclass(frozen=True)
class SceneConfig:
    size: int = 32
    object_scale: tuple[float, float] = (0.5, 0.85)  # object side / scene side
    objects: str = "auto"  # "auto" | "emoji" | "shapes" | a folder of RGBA PNGs
    background_mix: tuple[float, float, float] = (0.6, 0.2, 0.2)  # photo, plain, gradient
    emoji: str = EMOJI
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- objects


def find_emoji_font() -> str | None:
    env = os.environ.get("DIFFGEO_EMOJI_FONT")
    for path in ((env,) if env else ()) + EMOJI_FONT_CANDIDATES:
        if path and Path(path).is_file():
            return path
    return None


@lru_cache(maxsize=4)
def _emoji_glyphs(font_path: str, chars: str) -> tuple[tuple[str, Image.Image], ...]:
    # Noto Color Emoji is a bitmap (CBDT) font that only renders at size 109.
    font = ImageFont.truetype(font_path, 109)
    glyphs = []
    for ch in chars:
        canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((8, 8), ch, font=font, embedded_color=True)
        box = canvas.getbbox()
        if box is None:
            continue
        glyphs.append((f"U+{ord(ch):04X}", canvas.crop(box)))
    return tuple(glyphs)


@lru_cache(maxsize=4)
def _folder_objects(folder: str) -> tuple[tuple[str, Image.Image], ...]:
    files = sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True))
    if not files:
        raise InputError(f"objects: no PNG files found under {folder!r}")
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGBA")
            box = im.getchannel("A").getbbox()
            if box is not None:
                out.append((os.path.relpath(f, folder), im.crop(box)))
    return tuple(out)


def _shape_object(rng: np.random.Generator, side: int) -> tuple[str, Image.Image]:
    """A procedural object: a coloured shape with a darker outline, drawn at 4x and reduced."""
    kind = ["disk", "square", "triangle", "star", "ring"][int(rng.integers(5))]
    big = side * 4
    im = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    color = tuple(int(v) for v in rng.integers(30, 256, 3)) + (255,)
    edge = tuple(int(v * 0.5) for v in color[:3]) + (255,)
    w = max(2, big // 16)
    m = big // 10
    if kind == "disk":
        d.ellipse((m, m, big - m, big - m), fill=color, outline=edge, width=w)
    elif kind == "square":
        d.rectangle((m, m, big - m, big - m), fill=color, outline=edge, width=w)
    elif kind == "triangle":
        d.polygon([(big / 2, m), (big - m, big - m), (m, big - m)], fill=color, outline=edge)
    elif kind == "ring":
        d.ellipse((m, m, big - m, big - m), fill=color, outline=edge, width=w)
        d.ellipse((big / 3, big / 3, 2 * big / 3, 2 * big / 3), fill=(0, 0, 0, 0))
    else:
        c, r1, r2 = big / 2, big / 2 - m, big / 5
        pts = []
        for i in range(10):
            ang = np.pi / 2 + i * np.pi / 5
            r = r1 if i % 2 == 0 else r2
            pts.append((c + r * np.cos(ang), c - r * np.sin(ang)))
        d.polygon(pts, fill=color, outline=edge)
    return kind, im


def _resize_rgba(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    # Premultiplied alpha avoids dark fringes when the glyph is reduced.
    return im.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")


# ----------------------------------------------------------------------------- backgrounds


@lru_cache(maxsize=1)
def _photo_backgrounds() -> tuple[tuple[str, np.ndarray], ...]:
    out: list[tuple[str, np.ndarray]] = []
    try:
        import skimage.data as skd

        for name in ("grass", "gravel", "brick", "coffee", "chelsea", "astronaut", "rocket"):
            arr = np.asarray(getattr(skd, name)(), dtype=np.float32) / 255.0
            out.append((f"skimage:{name}", arr))
    except Exception:  # scikit-image is an optional extra; plain and gradient fields remain
        pass
    try:
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        for fname, arr in zip(data.filenames, data.images, strict=True):
            out.append((f"sklearn:{Path(fname).name}", np.asarray(arr, np.float32) / 255.0))
    except Exception:
        pass
    return tuple(out)


def _photo_crop(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray] | None:
    photos = _photo_backgrounds()
    if not photos:
        return None
    name, arr = photos[int(rng.integers(len(photos)))]
    h, w = arr.shape[:2]
    side = int(min(h, w) * rng.uniform(0.15, 0.8))
    r0 = int(rng.integers(0, h - side + 1))
    c0 = int(rng.integers(0, w - side + 1))
    crop = arr[r0 : r0 + side, c0 : c0 + side]
    if crop.ndim == 2:  # grey textures get a random tint so colour is not a giveaway
        tint = rng.uniform(0.35, 1.0, 3).astype(np.float32)
        crop = crop[..., None] * tint
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    im = Image.fromarray(np.clip(crop * 255 + 0.5, 0, 255).astype(np.uint8))
    im = im.resize((size, size), Image.Resampling.BOX)
    return f"{name}@{r0},{c0},{side}", np.asarray(im)


def _plain(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    c = rng.integers(0, 256, 3)
    return "plain", np.broadcast_to(c.astype(np.uint8), (size, size, 3)).copy()


def _gradient(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(ang) * xx + np.sin(ang) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-8)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    return "gradient", np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scenes


def _object_pool(config: SceneConfig) -> tuple[tuple[str, Image.Image], ...] | None:
    """Fixed object images for the config, or None for procedural shapes."""
    if config.objects == "shapes":
        return None
    if config.objects in ("auto", "emoji"):
        font = find_emoji_font()
        if font is None:
            if config.objects == "emoji":
                raise InputError(
                    "objects='emoji' needs the Noto Color Emoji font; install Debian's "
                    "fonts-noto-color-emoji or set DIFFGEO_EMOJI_FONT to the .ttf path"
                )
            return None
        return _emoji_glyphs(font, config.emoji)
    return _folder_objects(config.objects)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one scene: independent of how many scenes are drawn before it."""
    if split not in SPLIT_KEYS:
        raise InputError(f"split must be one of {sorted(SPLIT_KEYS)}, got {split!r}")
    return np.random.default_rng([seed, SPLIT_KEYS[split], index])


def make_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    size = config.size
    u = rng.random()
    p_photo, p_plain, _ = config.background_mix
    bg = None
    if u < p_photo:
        bg = _photo_crop(rng, size)
    if bg is None:
        bg = _plain(rng, size) if u < p_photo + p_plain else _gradient(rng, size)
    bg_name, bg_u8 = bg

    side = max(3, int(round(size * rng.uniform(*config.object_scale))))
    pool = _object_pool(config)
    if pool is None:
        obj_name, obj_im = _shape_object(rng, side)
    else:
        obj_name, obj_im = pool[int(rng.integers(len(pool)))]
    w0, h0 = obj_im.size
    scale = side / max(w0, h0)
    ow, oh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    if rng.random() < 0.5:
        obj_im = obj_im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    obj_small = np.asarray(_resize_rgba(obj_im, (ow, oh)))
    # Keep the whole object inside the frame: the ground truth stays complete.
    top = int(rng.integers(0, size - oh + 1))
    left = int(rng.integers(0, size - ow + 1))

    obj_rgb = np.zeros((size, size, 3), np.uint8)
    alpha = np.zeros((size, size), np.uint8)
    obj_rgb[top : top + oh, left : left + ow] = obj_small[..., :3]
    alpha[top : top + oh, left : left + ow] = obj_small[..., 3]
    return Scene(
        background=bg_u8.astype(np.float32) / 255.0,
        object_rgb=obj_rgb.astype(np.float32) / 255.0,
        alpha=alpha.astype(np.float32) / 255.0,
        object_name=obj_name,
        background_name=bg_name,
    )


def generate_scenes(
    n: int, seed: int = 0, split: str = "train", config: SceneConfig = SceneConfig(), start: int = 0
) -> Iterator[Scene]:
    """Scenes ``start .. start + n - 1`` of a split; scene i is the same whatever n and start."""
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    for i in range(start, start + n):
        yield make_scene(scene_rng(seed, split, i), config)


def scenes_to_tensor(scenes: Sequence[Scene]):
    """Composites as a float32 tensor (N, 3, H, W) in [-1, 1]."""
    import torch

    arr = np.stack([s.composite for s in scenes]).transpose(0, 3, 1, 2)
    return torch.from_numpy(arr * 2.0 - 1.0).float()


# ----------------------------------------------------------------------------- storage


def save_scenes(path: str | Path, scenes: Sequence[Scene]) -> None:
    """Store parts as uint8 (exact: the parts are quantised when made) in one compressed NPZ."""
    q = lambda a: np.round(a * 255.0).astype(np.uint8)  # noqa: E731
    np.savez_compressed(
        path,
        background=np.stack([q(s.background) for s in scenes]),
        object_rgb=np.stack([q(s.object_rgb) for s in scenes]),
        alpha=np.stack([q(s.alpha) for s in scenes]),
        object_name=np.array([s.object_name for s in scenes]),
        background_name=np.array([s.background_name for s in scenes]),
    )


def load_scenes(path: str | Path) -> list[Scene]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scene file not found: {path}")
    with np.load(path) as z:
        bg, obj, al = z["background"], z["object_rgb"], z["alpha"]
        on, bn = z["object_name"], z["background_name"]
    return [
        Scene(
            background=bg[i].astype(np.float32) / 255.0,
            object_rgb=obj[i].astype(np.float32) / 255.0,
            alpha=al[i].astype(np.float32) / 255.0,
            object_name=str(on[i]),
            background_name=str(bn[i]),
        )
        for i in range(len(bg))
    ]


def bundled_scenes(size: int = 32) -> list[Scene]:
    """The held-out evaluation scenes that ship with diffgeo (see scripts/build_scenes.py)."""
    from importlib import resources

    path = Path(str(resources.files("diffgeo") / "assets" / "scenes" / f"heldout-{size}.npz"))
    if not path.is_file():
        raise InputError(f"no bundled scenes of size {size}; available: "
                         + ", ".join(sorted(p.name for p in path.parent.glob("heldout-*.npz"))))
    return load_scenes(path)
