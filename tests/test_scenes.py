"""Tests for diffgeo.data.scenes: determinism, exact recomposition, storage, object sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import diffgeo.data.scenes as scenes_mod
from diffgeo.data.scenes import (
    SceneConfig,
    bundled_scenes,
    find_emoji_font,
    generate_scenes,
    load_scenes,
    make_scene,
    save_scenes,
    scene_rng,
    scenes_to_tensor,
)
from diffgeo.errors import InputError

SHAPE_KINDS = {"disk", "square", "triangle", "star", "ring"}
SHAPES = SceneConfig(size=24, objects="shapes")


def _parts(s):
    return s.background, s.object_rgb, s.alpha


def _same_scene(a, b) -> bool:
    return (
        all(np.array_equal(x, y) for x, y in zip(_parts(a), _parts(b), strict=True))
        and a.object_name == b.object_name
        and a.background_name == b.background_name
    )


def _is_quantised(x: np.ndarray) -> bool:
    """True if every value is exactly k/255 in float32 (what save_scenes stores losslessly)."""
    return np.array_equal(np.round(x * 255.0).astype(np.uint8).astype(np.float32) / 255.0, x)


@pytest.fixture
def no_emoji_font(monkeypatch, tmp_path):
    """Make the emoji font unavailable, whatever this machine has installed."""
    monkeypatch.setenv("DIFFGEO_EMOJI_FONT", str(tmp_path / "missing" / "NotoColorEmoji.ttf"))
    monkeypatch.setattr(scenes_mod, "EMOJI_FONT_CANDIDATES", ())
    assert find_emoji_font() is None


# ------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("config", [SceneConfig(size=24), SHAPES], ids=["auto", "shapes"])
def test_same_seed_split_index_gives_identical_scene(config):
    a = list(generate_scenes(4, seed=3, split="train", config=config))
    b = list(generate_scenes(4, seed=3, split="train", config=config))
    assert all(_same_scene(x, y) for x, y in zip(a, b, strict=True))
    # ... and scenes within one run are not copies of each other.
    assert not np.array_equal(a[0].composite, a[1].composite)


def test_different_seeds_give_different_scenes():
    a = list(generate_scenes(3, seed=0, config=SHAPES))
    b = list(generate_scenes(3, seed=1, config=SHAPES))
    for x, y in zip(a, b, strict=True):
        assert not np.array_equal(x.composite, y.composite)


def test_scene_i_does_not_depend_on_start_or_n():
    run = list(generate_scenes(6, seed=5, split="train"))
    for i in (0, 3, 5):
        alone = next(generate_scenes(1, seed=5, split="train", start=i))
        assert _same_scene(alone, run[i])
    tail = list(generate_scenes(3, seed=5, split="train", start=3))
    assert all(_same_scene(x, y) for x, y in zip(tail, run[3:], strict=True))
    # make_scene on the per-scene generator is the same scene too.
    assert _same_scene(make_scene(scene_rng(5, "train", 4)), run[4])


def test_splits_differ_with_the_same_seed():
    train = list(generate_scenes(4, seed=0, split="train"))
    held = list(generate_scenes(4, seed=0, split="heldout"))
    for x, y in zip(train, held, strict=True):
        assert not np.array_equal(x.composite, y.composite)


def test_bad_split_and_negative_n_are_input_errors():
    with pytest.raises(InputError, match="split must be one of"):
        scene_rng(0, "test", 0)
    with pytest.raises(InputError, match="n must be >= 0"):
        list(generate_scenes(-1))
    assert list(generate_scenes(0)) == []


# ------------------------------------------------------------------------------ recomposition


def test_parts_recompose_exactly_and_survive_a_round_trip(tmp_path):
    scenes = list(generate_scenes(6, seed=2, split="train"))
    for s in scenes:
        a = s.alpha[..., None]
        comp = s.composite
        assert comp.dtype == np.float32 and comp.shape == (*s.size, 3)
        assert np.array_equal(comp, (a * s.object_rgb + (1.0 - a) * s.background)
                              .astype(np.float32))
        # Where the object is absent the composite *is* the background, where it is opaque
        # it *is* the object: exact ground truth for removal.
        assert np.array_equal(comp[s.alpha == 0], s.background[s.alpha == 0])
        assert np.array_equal(comp[s.alpha == 1], s.object_rgb[s.alpha == 1])
        assert 0.0 <= comp.min() and comp.max() <= 1.0
        # Parts are quantised when made, so uint8 storage is lossless.
        assert all(_is_quantised(p) for p in _parts(s))

    path = tmp_path / "scenes.npz"
    save_scenes(path, scenes)
    loaded = load_scenes(path)
    assert len(loaded) == len(scenes)
    for s, t in zip(scenes, loaded, strict=True):
        assert _same_scene(s, t)
        assert np.array_equal(s.composite, t.composite)  # bit-identical
        assert np.array_equal(s.mask, t.mask)


def test_load_scenes_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="scene file not found"):
        load_scenes(tmp_path / "nope.npz")


def test_scenes_to_tensor_shape_and_range():
    scenes = list(generate_scenes(3, seed=0, config=SHAPES))
    x = scenes_to_tensor(scenes)
    assert tuple(x.shape) == (3, 3, 24, 24)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    np.testing.assert_allclose(x[1].permute(1, 2, 0).numpy(),
                               scenes[1].composite * 2 - 1, atol=1e-6)


def test_object_is_present_in_every_scene():
    for s in generate_scenes(12, seed=0, split="heldout", config=SceneConfig(size=24)):
        assert s.alpha.sum() > 0
        assert s.mask.sum() > 0
        assert 0.0 <= s.alpha.min() and s.alpha.max() <= 1.0


# ------------------------------------------------------------------------------ object sources


def test_shapes_work_without_the_emoji_font(no_emoji_font):
    got = list(generate_scenes(8, seed=0, config=SHAPES))
    assert {s.object_name for s in got} <= SHAPE_KINDS
    assert all(s.mask.sum() > 0 for s in got)
    # "auto" falls back to the same shapes when the font is missing.
    auto = list(generate_scenes(4, seed=0, config=SceneConfig(size=24, objects="auto")))
    assert {s.object_name for s in auto} <= SHAPE_KINDS


def test_emoji_without_font_is_a_clear_input_error(no_emoji_font):
    with pytest.raises(InputError, match="fonts-noto-color-emoji") as e:
        next(generate_scenes(1, config=SceneConfig(size=24, objects="emoji")))
    assert "DIFFGEO_EMOJI_FONT" in str(e.value)


@pytest.mark.skipif(find_emoji_font() is None, reason="Noto Color Emoji font not installed")
def test_emoji_objects_when_the_font_is_installed():
    got = list(generate_scenes(4, seed=0, config=SceneConfig(size=24, objects="emoji")))
    assert all(s.object_name.startswith("U+") for s in got)
    assert all(s.mask.sum() > 0 for s in got)


def _rgba_png(path: Path, draw) -> None:
    im = Image.new("RGBA", (24, 20), (0, 0, 0, 0))
    draw(ImageDraw.Draw(im))
    im.save(path)


def test_folder_of_rgba_pngs_as_objects(tmp_path):
    folder = tmp_path / "objects"
    (folder / "sub").mkdir(parents=True)
    _rgba_png(folder / "disk.png", lambda d: d.ellipse((4, 2, 18, 16), fill=(200, 30, 30, 255)))
    _rgba_png(folder / "sub" / "bar.png", lambda d: d.rectangle((2, 8, 21, 12),
                                                                fill=(20, 40, 220, 255)))
    cfg = SceneConfig(size=24, objects=str(folder))
    got = list(generate_scenes(16, seed=0, config=cfg))
    names = {s.object_name for s in got}
    # Names are paths relative to the folder (recursive search); with 16 draws both appear.
    assert names == {"disk.png", str(Path("sub") / "bar.png")}
    assert all(s.mask.sum() > 0 for s in got)
    disk = next(s for s in got if s.object_name == "disk.png")
    # The object colour is the PNG's colour inside the object: the median over opaque pixels
    # is exact up to one grey level (LANCZOS rings by up to ~10% right at the edge, so no
    # per-pixel bound is asserted).
    opaque = disk.alpha == 1.0
    assert opaque.sum() > 10
    np.testing.assert_allclose(np.median(disk.object_rgb[opaque], axis=0),
                               [200 / 255, 30 / 255, 30 / 255], atol=1.01 / 255)


def test_folder_objects_lie_fully_inside_the_frame(tmp_path):
    # A fully opaque square object: its mask in the scene must be a complete square whose side
    # is within the configured object_scale of the scene side; a clipped object would show as
    # a non-square or partially filled box.
    folder = tmp_path / "square"
    folder.mkdir()
    im = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((5, 5, 24, 24), fill=(10, 200, 10, 255))
    im.save(folder / "sq.png")
    size = 24
    for s in generate_scenes(20, seed=1, config=SceneConfig(size=size, objects=str(folder))):
        rows = np.flatnonzero(s.mask.any(axis=1))
        cols = np.flatnonzero(s.mask.any(axis=0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert h == w
        assert s.mask.sum() == h * w  # a filled square, nothing cut off
        # side = round(size * U(0.5, 0.85)); +-1 for the rounding.
        assert round(0.5 * size) - 1 <= h <= round(0.85 * size) + 1


def test_folder_without_pngs_is_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no PNG files"):
        next(generate_scenes(1, config=SceneConfig(size=24, objects=str(tmp_path / "empty"))))


# ------------------------------------------------------------------------------ bundled scenes


def test_bundled_scenes_32():
    scenes = bundled_scenes(32)
    assert len(scenes) == 64
    for s in scenes:
        assert s.size == (32, 32)
        assert s.composite.shape == (32, 32, 3)
        assert s.mask.sum() > 0
        assert s.object_name and s.background_name
    # 64 distinct compositions, not one repeated.
    assert len({s.composite.tobytes() for s in scenes}) == 64


def test_bundled_scenes_of_unknown_size_name_the_available_ones():
    with pytest.raises(InputError, match="no bundled scenes of size 17") as e:
        bundled_scenes(17)
    assert "32" in str(e.value)


def _has_skimage() -> bool:
    try:
        import skimage.data  # noqa: F401
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(find_emoji_font() is None or not _has_skimage(),
                    reason="needs the emoji font and scikit-image/scikit-learn backgrounds")
def test_bundled_scenes_match_the_generator():
    # The bundled file is documented as heldout split, seed 0, emoji objects (build_scenes.py).
    bundled = bundled_scenes(32)[:4]
    fresh = list(generate_scenes(4, seed=0, split="heldout",
                                 config=SceneConfig(size=32, objects="emoji")))
    assert all(_same_scene(a, b) for a, b in zip(bundled, fresh, strict=True))
