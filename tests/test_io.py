"""diffgeo.io (and image_psnr): loading and fitting images and masks, points, boxes, results."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffgeo.errors import InputError, OutputExistsError
from diffgeo.io import (
    FIT_MODES,
    Fit,
    ResultDir,
    box_mask,
    fit_tensor,
    image_from_array,
    load_image,
    load_images,
    load_mask,
    parse_box,
    parse_point,
    to_jsonable,
    to_uint8,
    validate_point,
)
from diffgeo.metrics import image_psnr as psnr

# ------------------------------------------------------------------------------------------
# helpers


def _save(tmp_path: Path, name: str, arr: np.ndarray, mode: str | None = None, **kw) -> Path:
    path = tmp_path / name
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path, **kw)
    return path


def _three_bands(h: int = 40, w: int = 80) -> torch.Tensor:
    """(1, 3, h, w): -1 in the outer quarters of the width, +1 in the middle half."""
    x = -torch.ones(1, 3, h, w)
    x[..., w // 4 : 3 * w // 4] = 1.0
    return x


# ------------------------------------------------------------------------------------------
# fit modes


def test_fit_modes_constant() -> None:
    assert FIT_MODES == ("crop", "pad", "resize")


def test_fit_crop_keeps_centre() -> None:
    y, fit = fit_tensor(_three_bands(), (32, 32), "crop")
    assert y.shape == (1, 3, 32, 32)
    # shorter side (40) -> 32: scale 0.8, width 80 -> 64, centre 32 columns kept
    assert fit.mode == "crop"
    assert fit.scale_y == pytest.approx(0.8) and fit.scale_x == pytest.approx(0.8)
    assert fit.offset_y == 0 and fit.offset_x == -16
    # the kept part is the bright middle band (edges blur slightly under bicubic resampling)
    assert y[..., 2:-2].min() > 0.9
    assert y.mean() > 0.9


def test_fit_pad_adds_constant_bands() -> None:
    x = torch.ones(1, 3, 40, 80)
    y, fit = fit_tensor(x, (32, 32), "pad")
    assert y.shape == (1, 3, 32, 32)
    # longer side (80) -> 32: scale 0.4, height 40 -> 16, 8 rows of padding above and below
    assert fit.scale_y == pytest.approx(0.4) and fit.scale_x == pytest.approx(0.4)
    assert fit.offset_y == 8 and fit.offset_x == 0
    assert torch.all(y[..., :8, :] == 0.0) and torch.all(y[..., 24:, :] == 0.0)
    assert torch.allclose(y[..., 8:24, :], torch.ones(1, 3, 16, 32), atol=1e-5)
    y2, _ = fit_tensor(x, (32, 32), "pad", pad_value=-1.0)
    assert torch.all(y2[..., :8, :] == -1.0)


def test_fit_resize_changes_aspect() -> None:
    y, fit = fit_tensor(_three_bands(), (32, 32), "resize")
    assert y.shape == (1, 3, 32, 32)
    assert fit.scale_y == pytest.approx(0.8) and fit.scale_x == pytest.approx(0.4)
    assert fit.offset_y == 0 and fit.offset_x == 0
    # the bands now occupy 8 / 16 / 8 of 32 columns: the whole input is visible, squeezed
    assert y[..., :6].max() < -0.9 and y[..., 26:].max() < -0.9
    assert y[..., 10:22].min() > 0.9


def test_fit_identity_and_missing_fit() -> None:
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    y, fit = fit_tensor(x, (16, 24), None)
    assert y is x and fit.mode == "none" and fit.map_point((3, 5)) == (3.0, 5.0)
    with pytest.raises(InputError, match=r"16x24.*32x32.*crop.*pad.*resize.*--fit"):
        fit_tensor(x, (32, 32), None)
    with pytest.raises(InputError, match=r"fit must be one of.*'squash'"):
        fit_tensor(x, (32, 32), "squash")
    with pytest.raises(InputError, match=r"fit must be one of"):
        fit_tensor(x, (16, 24), "squash")  # checked even when no fitting is needed
    with pytest.raises(InputError, match=r"size must be a pair"):
        fit_tensor(x, (32, 0), "crop")


def test_fit_images_are_clamped_and_masks_bilinear() -> None:
    # a sharp edge overshoots under bicubic; the result must stay within [-1, 1]
    x = -torch.ones(1, 1, 40, 40)
    x[..., 20:] = 1.0
    y, _ = fit_tensor(x, (64, 64), "resize")
    assert y.min() >= -1.0 and y.max() <= 1.0
    m = torch.zeros(1, 1, 40, 40)
    m[..., 10:30, 10:30] = 1.0
    ym, _ = fit_tensor(m, (20, 20), "resize", is_mask=True)
    assert ym.min() >= 0.0 and ym.max() <= 1.0
    assert ym.sum().item() == pytest.approx(100.0, abs=1e-3)  # area preserved at 1/2 scale


@pytest.mark.parametrize("mode", FIT_MODES)
def test_fit_map_point_centre_and_corners(mode: str) -> None:
    _, fit = fit_tensor(torch.zeros(1, 1, 40, 80), (32, 32), mode)
    # the centre of the input (between pixels) maps to the centre of the output
    assert fit.map_point((19.5, 39.5)) == pytest.approx((15.5, 15.5))
    # outer corners of the input (pixel edges) map consistently with scale and offset
    r0, c0 = fit.map_point((-0.5, -0.5))
    r1, c1 = fit.map_point((39.5, 79.5))
    assert (r0, c0) == pytest.approx((fit.offset_y - 0.5, fit.offset_x - 0.5))
    assert r1 - r0 == pytest.approx(40 * fit.scale_y) and c1 - c0 == pytest.approx(80 * fit.scale_x)
    for p in [(0.0, 0.0), (12.25, 70.0), (39.0, 79.0)]:
        assert fit.unmap_point(fit.map_point(p)) == pytest.approx(p)


@pytest.mark.parametrize(
    ("mode", "points"),
    [
        ("crop", [(20, 40), (5, 25), (34, 55), (0, 24)]),
        ("pad", [(20, 40), (3, 3), (36, 76), (0, 79)]),
        ("resize", [(20, 40), (3, 3), (36, 76), (39, 0)]),
    ],
)
def test_fit_bright_pixel_lands_on_mapped_point(mode: str, points: list[tuple[int, int]]) -> None:
    for r, c in points:
        x = -torch.ones(1, 1, 40, 80)
        x[..., r, c] = 1.0
        y, fit = fit_tensor(x, (32, 32), mode, pad_value=-1.0)
        idx = int(torch.argmax(y))
        ar, ac = divmod(idx, 32)
        mr, mc = fit.map_point((r, c))
        assert abs(ar - mr) <= 1.0 and abs(ac - mc) <= 1.0, (mode, (r, c), (ar, ac), (mr, mc))
        pr, pc = fit.map_pixel((r, c))
        assert abs(pr - mr) <= 0.5 and abs(pc - mc) <= 0.5


def test_fit_map_pixel_refuses_cropped_away_point() -> None:
    _, fit = fit_tensor(torch.zeros(1, 1, 40, 80), (32, 32), "crop")
    with pytest.raises(InputError, match=r"--pixel \(20, 2\) lies outside.*crop"):
        fit.map_pixel((20, 2))
    with pytest.raises(InputError, match=r"--pixel \(50, 2\) lies outside the image of 40x80"):
        fit.map_pixel((50, 2))


def test_fit_object_is_reusable_and_serialisable() -> None:
    x = torch.rand(1, 3, 40, 80) * 2 - 1
    y, fit = fit_tensor(x, (32, 32), "pad")
    y2, fit2 = fit_tensor(x, (32, 32), fit)
    assert torch.equal(y, y2) and fit2 == fit
    with pytest.raises(InputError, match=r"Fit maps 40x80.*image is 20x80"):
        fit_tensor(torch.zeros(1, 3, 20, 80), (32, 32), fit)
    d = fit.to_dict()
    assert d["mode"] == "pad" and d["in_size"] == [40, 80] and d["out_size"] == [32, 32]
    json.dumps(d)


# ------------------------------------------------------------------------------------------
# loading images


def test_load_image_rgba_composited_on_background(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 0)  # fully transparent red -> background
    arr[0, 1] = (0, 0, 0, 255)  # opaque black
    arr[1, 0] = (0, 0, 0, 128)  # half-transparent black
    arr[1, 1] = (0, 0, 255, 255)  # opaque blue
    path = _save(tmp_path, "rgba.png", arr)
    x, fit = load_image(path)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32 and fit.mode == "none"
    assert torch.allclose(x[0, :, 0, 0], torch.ones(3))  # white background
    assert torch.allclose(x[0, :, 0, 1], -torch.ones(3))
    assert torch.allclose(x[0, :, 1, 0], torch.full((3,), 1 - 2 * 128 / 255), atol=1e-5)
    assert torch.allclose(x[0, :, 1, 1], torch.tensor([-1.0, -1.0, 1.0]))
    xb, _ = load_image(path, background=0.0)
    assert torch.allclose(xb[0, :, 0, 0], -torch.ones(3))  # black background
    with pytest.raises(InputError, match=r"background must lie in \[0, 1\].*2"):
        load_image(path, background=2)


def test_load_image_palette_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0  # palette index 0 is transparent
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    x, _ = load_image(path)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red
    assert torch.allclose(x[0, :, 0, 1], torch.ones(3))  # transparent -> white


def test_load_image_grayscale_and_luminance(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    x, _ = load_image(_save(tmp_path, "g.png", gray))
    assert x.shape == (1, 3, 3, 4)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert torch.allclose(x[0, 0], torch.from_numpy(gray / 255 * 2 - 1).float(), atol=1e-6)
    x1, _ = load_image(_save(tmp_path, "g2.png", gray), channels=1)
    assert x1.shape == (1, 1, 3, 4)
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    lum, _ = load_image(_save(tmp_path, "rgb.png", rgb), channels=1)
    expected = torch.tensor([0.299, 0.587, 0.114]) * 2 - 1
    assert torch.allclose(lum[0, 0, 0], expected, atol=1e-5)
    with pytest.raises(InputError, match=r"channels must be 1 or 3; got 2"):
        load_image(tmp_path / "rgb.png", channels=2)


def test_load_image_16bit_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(9, 7), dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 0, 65535
    path = _save(tmp_path, "g16.png", arr)
    assert Image.open(path).mode.startswith("I")
    x, _ = load_image(path, channels=1)
    expected = torch.from_numpy(arr.astype(np.float64) / 65535 * 2 - 1).float()
    assert (x[0, 0] - expected).abs().max() < 1e-4
    # 8-bit quantisation would be far off: values differ from a /255 reading
    assert x.max() == 1.0 and x.min() == -1.0
    x3, _ = load_image(path)
    assert x3.shape == (1, 3, 9, 7)


def test_load_webp_and_jpeg(tmp_path: Path) -> None:
    arr = np.zeros((16, 24, 3), np.uint8)
    arr[:, :12] = (200, 40, 90)
    arr[:, 12:] = (10, 220, 30)
    webp = _save(tmp_path, "a.webp", arr, lossless=True)
    x, _ = load_image(webp)
    assert x.shape == (1, 3, 16, 24)
    assert torch.equal(x, image_from_array(arr))
    jpg = _save(tmp_path, "a.jpg", arr, quality=95)
    xj, _ = load_image(jpg, (8, 8), "crop")
    assert xj.shape == (1, 3, 8, 8)
    xj_full, _ = load_image(jpg)
    assert psnr(xj_full, image_from_array(arr)) > 25


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[0, 0] = 255  # top-left marker
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    x, _ = load_image(path)
    assert x.shape == (1, 3, 20, 10)
    # after a 90 degree clockwise rotation the top-left marker is at the top-right
    r, c = divmod(int(torch.argmax(x[0, 0])), 10)
    assert r <= 1 and c >= 8


def test_load_image_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match=r"image file not found: .*nope\.png"):
        load_image(missing)
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture\n")
    with pytest.raises(InputError, match=r"not a readable image: .*notes\.png \("):
        load_image(fake)
    with pytest.raises(InputError, match=r"folder"):
        load_image(tmp_path)
    ok = _save(tmp_path, "ok.png", np.zeros((40, 80, 3), np.uint8))
    with pytest.raises(InputError, match=r"image is 40x80.*32x32.*--fit"):
        load_image(ok, (32, 32))


def test_load_images_batches(tmp_path: Path) -> None:
    a = _save(tmp_path, "a.png", np.zeros((8, 8, 3), np.uint8))
    b = _save(tmp_path, "b.png", np.full((8, 8, 3), 255, np.uint8))
    c = _save(tmp_path, "c.png", np.zeros((8, 16, 3), np.uint8))
    x, fits = load_images([a, b])
    assert x.shape == (2, 3, 8, 8) and len(fits) == 2
    assert x[0].max() == -1 and x[1].min() == 1
    with pytest.raises(InputError, match=r"same size.*c\.png: 8x16"):
        load_images([a, c])
    x2, fits2 = load_images([a, c], (8, 8), "pad")
    assert x2.shape == (2, 3, 8, 8) and fits2[1].mode == "pad"
    with pytest.raises(InputError, match=r"at least one"):
        load_images([])


def test_image_from_array_and_to_uint8() -> None:
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    x = image_from_array(u8)
    assert x.shape == (1, 3, 5, 6) and x.dtype == torch.float32
    assert np.array_equal(to_uint8(x), u8)
    assert np.array_equal(to_uint8(x[0]), u8)
    u16 = np.array([[0, 65535]], np.uint16)
    assert torch.equal(image_from_array(u16), torch.tensor([[[[-1.0, 1.0]]]]))
    f = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert torch.allclose(image_from_array(f), torch.tensor([[[[-1.0, 0.0, 1.0]]]]))
    with pytest.raises(InputError, match=r"image values must lie in \[0, 1\].*max 2"):
        image_from_array(np.array([[0.0, 2.0]]))
    with pytest.raises(InputError, match=r"image must have shape"):
        image_from_array(np.zeros((2, 2, 2, 2), np.uint8))
    batch = torch.zeros(2, 3, 4, 4)
    with pytest.raises(InputError, match=r"batch has 2 images; pass index="):
        to_uint8(batch)
    assert to_uint8(batch, index=1).shape == (4, 4, 3)


# ------------------------------------------------------------------------------------------
# masks


def test_load_mask_from_file_array_and_tensor(tmp_path: Path) -> None:
    arr = np.zeros((8, 8), np.uint8)
    arr[2:6, 3:5] = 255
    m = load_mask(_save(tmp_path, "m.png", arr), (8, 8))
    assert m.shape == (1, 1, 8, 8) and m.dtype == torch.float32
    expected = torch.from_numpy(arr / 255).float()[None, None]
    assert torch.equal(m, expected)
    assert torch.equal(load_mask(arr, (8, 8)), expected)
    assert torch.equal(load_mask(arr > 0, (8, 8)), expected)
    assert torch.equal(load_mask(torch.from_numpy(arr > 0), (8, 8)), expected)
    assert torch.equal(load_mask(expected, (8, 8)), expected)
    assert torch.equal(load_mask(expected[0], (8, 8)), expected)
    assert torch.equal(load_mask(arr[:, :, None], (8, 8)), expected)
    # RGB file: luminance
    rgb = np.repeat(arr[:, :, None], 3, axis=2)
    assert torch.equal(load_mask(_save(tmp_path, "m_rgb.png", rgb), (8, 8)), expected)
    # uint16
    m16 = load_mask((arr.astype(np.uint16) * 257), (8, 8))
    assert torch.allclose(m16, expected)


def test_load_mask_uses_alpha_of_a_stencil(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)  # constant colour everywhere
    rgba[1:4, 1:4, 3] = 255  # shape given by alpha only
    m = load_mask(_save(tmp_path, "stencil.png", rgba), (8, 8))
    assert m.sum().item() == 9 and m[0, 0, 1, 1] == 1 and m[0, 0, 0, 0] == 0


def test_load_mask_fit_invert_binary() -> None:
    arr = np.zeros((40, 80), np.float32)
    arr[10:30, 30:50] = 1.0  # a square in the centre
    m = load_mask(arr, (32, 32), "crop", input_size=(40, 80))
    assert m.shape == (1, 1, 32, 32)
    img, fit = fit_tensor(torch.from_numpy(arr)[None, None], (32, 32), "crop", is_mask=True)
    assert torch.allclose(m, img)
    # the same result with the image's Fit object
    assert torch.allclose(load_mask(arr, (32, 32), fit), m)
    mb = load_mask(arr, (32, 32), "crop", binary=True)
    assert set(mb.unique().tolist()) <= {0.0, 1.0}
    assert mb.sum().item() == pytest.approx(16 * 16, abs=16)
    # invert happens before fitting: padded bands stay 0 (outside the region of interest)
    mi = load_mask(arr, (32, 32), "pad", invert=True)
    assert torch.all(mi[..., :8, :] == 0) and torch.all(mi[..., 24:, :] == 0)
    assert mi[0, 0, 9, 0] > 0.99 and mi[0, 0, 15, 15] < 0.01


def test_load_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"mask is 40x80.*32x32.*--fit"):
        load_mask(np.ones((40, 80), np.uint8), (32, 32))
    with pytest.raises(InputError, match=r"mask is 20x20.*belongs to is 40x80"):
        load_mask(np.ones((20, 20), np.uint8), (32, 32), "crop", input_size=(40, 80))
    with pytest.raises(InputError, match=r"mask is empty"):
        load_mask(np.zeros((8, 8), np.uint8), (8, 8))
    tiny = np.zeros((40, 40), np.float32)
    tiny[0, 0] = 0.2  # survives fitting, but not thresholding
    with pytest.raises(InputError, match=r"mask is empty.*thresholding"):
        load_mask(tiny, (20, 20), "resize", binary=True)
    with pytest.raises(InputError, match=r"mask values must lie in \[0, 1\].*min -0.5.*max 3"):
        load_mask(np.array([[-0.5, 3.0]]), (1, 2))
    with pytest.raises(InputError, match=r"mask values must lie in \[0, 1\].*max 255"):
        load_mask(torch.full((4, 4), 255.0), (4, 4))
    with pytest.raises(InputError, match=r"mask contains NaN"):
        load_mask(np.array([[0.5, np.nan]]), (1, 2))
    with pytest.raises(InputError, match=r"mask must have one channel.*\(4, 4, 3\)"):
        load_mask(np.ones((4, 4, 3), np.uint8), (4, 4))
    with pytest.raises(InputError, match=r"mask must have one channel.*\(3, 4, 4\)"):
        load_mask(torch.ones(3, 4, 4), (4, 4))
    with pytest.raises(InputError, match=r"mask of dtype int64 must hold only 0 and 1"):
        load_mask(np.full((4, 4), 7, np.int64), (4, 4))
    with pytest.raises(InputError, match=r"mask file not found: .*gone\.png"):
        load_mask(tmp_path / "gone.png", (4, 4))
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match=r"not a readable image: .*mask\.png"):
        load_mask(bad, (4, 4))
    with pytest.raises(InputError, match=r"mask must be an image path.*list"):
        load_mask([[1, 0]], (1, 2))


# ------------------------------------------------------------------------------------------
# points and boxes


def test_parse_point_and_box() -> None:
    assert parse_point("12,34") == (12, 34)
    assert parse_point(" 12 , 34 ") == (12, 34)
    assert parse_box("1,2,10,20") == (1, 2, 10, 20)
    for text in ["12", "a,b", "1,2,3", "1.5,2", ""]:
        with pytest.raises(InputError, match=rf"--pixel expects 2 comma-separated.*{text!r}"):
            parse_point(text)
    with pytest.raises(InputError, match=r"--pixel expects non-negative.*'-1,2'"):
        parse_point("-1,2")
    with pytest.raises(InputError, match=r"--box expects 4 comma-separated.*'1,2,3'"):
        parse_box("1,2,3")
    with pytest.raises(InputError, match=r"--box expects R0 < R1 and C0 < C1.*'5,5,2,8'"):
        parse_box("5,5,2,8")
    with pytest.raises(InputError, match=r"--box expects R0 < R1.*'5,5,5,8'"):
        parse_box("5,5,5,8")
    with pytest.raises(InputError, match=r"--box expects non-negative.*'-1,0,2,2'"):
        parse_box("-1,0,2,2")
    with pytest.raises(InputError, match=r"--edit-pixel expects 2"):
        parse_point("x", name="--edit-pixel")


def test_validate_point_and_box_mask() -> None:
    assert validate_point((3, 4), (8, 8)) == (3, 4)
    with pytest.raises(InputError, match=r"--pixel \(8, 0\) lies outside the image of 8x8"):
        validate_point((8, 0), (8, 8))
    m = box_mask((1, 2, 4, 6), (8, 8))
    assert m.shape == (1, 1, 8, 8) and m.sum() == 3 * 4
    assert m[0, 0, 1, 2] == 1 and m[0, 0, 4, 6] == 0 and m[0, 0, 3, 5] == 1
    assert box_mask((0, 0, 8, 8), (8, 8)).sum() == 64
    with pytest.raises(InputError, match=r"--box \(0, 0, 9, 4\) extends outside.*8x8"):
        box_mask((0, 0, 9, 4), (8, 8))
    with pytest.raises(InputError, match=r"--box expects 0 <= r0 < r1"):
        box_mask((4, 0, 2, 4), (8, 8))


# ------------------------------------------------------------------------------------------
# psnr


def test_psnr() -> None:
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.2) == pytest.approx(20.0)  # mse 0.04, range 2 -> 10 log10(4 / .04)
    assert psnr(a, a + 0.1, data_range=1.0) == pytest.approx(20.0)
    with pytest.raises(InputError, match=r"same shape"):
        psnr(a, torch.zeros(1, 3, 4, 5))


# ------------------------------------------------------------------------------------------
# result writing


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_result_dir_refuses_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "run" / "nested"
    rd = ResultDir(out)
    assert out.is_dir()
    p = rd.save_json("summary", {"a": 1})
    assert p == out / "summary.json"
    # the same ResultDir may update its own file ...
    rd.save_json("summary.json", {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    # ... but a later run may not overwrite it without --force
    with pytest.raises(OutputExistsError, match=r"summary\.json exists; pass --force"):
        ResultDir(out).save_json("summary", {"a": 3})
    assert json.loads(p.read_text()) == {"a": 2}
    with pytest.raises(OutputExistsError, match=r"--force"):
        ResultDir(out).path_for("summary.json")
    ResultDir(out, force=True).save_json("summary", {"a": 4})
    assert json.loads(p.read_text()) == {"a": 4}
    assert _tmp_files(tmp_path) == []
    with pytest.raises(InputError, match=r"relative path"):
        rd.path_for("../escape.json")
    with pytest.raises(InputError, match=r"must end in \.png"):
        rd.save_image("x.jpg", torch.zeros(1, 3, 2, 2))


def test_result_dir_never_writes_protected_input(tmp_path: Path) -> None:
    src = _save(tmp_path, "input.png", np.zeros((4, 4, 3), np.uint8))
    before = src.read_bytes()
    rd = ResultDir(tmp_path, force=True, protect=[src])
    with pytest.raises(OutputExistsError, match=r"input files"):
        rd.save_image("input.png", torch.ones(1, 3, 4, 4))
    with pytest.raises(OutputExistsError, match=r"input files"):
        rd.save_image("input", torch.ones(1, 3, 4, 4))
    assert src.read_bytes() == before
    rd.save_image("output.png", torch.ones(1, 3, 4, 4))  # other names are fine
    assert _tmp_files(tmp_path) == []


def test_result_dir_writes_atomically(tmp_path: Path) -> None:
    rd = ResultDir(tmp_path / "out")

    class Unserialisable:
        pass

    # a failure while writing leaves neither the final file nor a temporary one
    with pytest.raises(TypeError, match=r"Unserialisable"):
        rd.save_json("bad", {"x": Unserialisable()})

    def boom(f) -> None:
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        rd.write("half.bin", boom)
    assert not (tmp_path / "out" / "bad.json").exists()
    assert not (tmp_path / "out" / "half.bin").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_result_dir_save_image_strip_npz_csv(tmp_path: Path) -> None:
    rd = ResultDir(tmp_path)
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    x = image_from_array(u8)
    p = rd.save_image("img", x)
    assert p.name == "img.png"
    assert np.array_equal(np.asarray(Image.open(p)), u8)
    back, _ = load_image(p)
    assert torch.allclose(back, x, atol=1e-6)
    rd.save_image("gray.png", torch.zeros(1, 6, 5))
    assert Image.open(tmp_path / "gray.png").mode == "L"
    strip = rd.save_strip("strip", [x, x[0], -torch.ones(1, 1, 6, 4)])
    s = np.asarray(Image.open(strip))
    assert s.shape == (6, 5 + 2 + 5 + 2 + 4, 3)
    assert (s[:, 5:7] == 255).all() and (s[:, 12:14] == 255).all()
    assert np.array_equal(s[:, :5], u8) and (s[:, 14:] == 0).all()
    with pytest.raises(InputError, match=r"one height"):
        rd.save_strip("bad", [x, torch.zeros(1, 3, 7, 5)])
    npz = rd.save_npz("arrays", latent=torch.ones(2, 3), idx=np.arange(4))
    with np.load(npz) as z:
        assert z["latent"].shape == (2, 3) and z["idx"].tolist() == [0, 1, 2, 3]
    csv_path = rd.save_csv("table", ["step", "psnr"], [(0, torch.tensor(1.5)), (1, np.float32(2))])
    assert csv_path.read_text().splitlines() == ["step,psnr", "0,1.5", "1,2.0"]
    with pytest.raises(InputError, match=r"row 0 has 1 values but the header has 2"):
        rd.save_csv("bad", ["a", "b"], [(1,)])
    assert _tmp_files(tmp_path) == []


def test_json_serialises_dataclass_with_tensor_and_path(tmp_path: Path) -> None:
    @dataclass
    class Record:
        name: str
        source: Path
        weights: torch.Tensor
        shape: tuple[int, int]
        dtype: torch.dtype
        device: torch.device
        score: np.float32
        best: float
        big: torch.Tensor
        fit: Fit

    rec = Record(
        name="run",
        source=tmp_path / "in.png",
        weights=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        shape=(3, 4),
        dtype=torch.float16,
        device=torch.device("cpu"),
        score=np.float32(0.5),
        best=math.inf,
        big=torch.zeros(100, 100),
        fit=Fit.identity((4, 4)),
    )
    p = ResultDir(tmp_path / "out").save_json("record", {"z": 1, "record": rec})
    text = p.read_text()
    data = json.loads(text)
    assert list(data) == ["record", "z"]  # sorted keys
    assert '\n  "record": {' in text  # indent 2
    r = data["record"]
    assert r["source"] == str(tmp_path / "in.png")
    assert r["weights"] == [[1.0, 2.0], [3.0, 4.0]]
    assert r["shape"] == [3, 4]
    assert r["dtype"] == "torch.float16" and r["device"] == "cpu"
    assert r["score"] == 0.5 and r["best"] == "inf"
    assert r["big"] == {
        "shape": [100, 100],
        "dtype": "float32",
        "min": 0.0,
        "max": 0.0,
        "mean": 0.0,
    }
    assert r["fit"]["mode"] == "none"
    assert to_jsonable(np.arange(3)) == [0, 1, 2]


# ------------------------------------------------------------------------------------------
# region rules


def test_region_rules_on_a_known_mask() -> None:
    from diffgeo.io.regions import area_resize, as_mask, cells_to_image, region_pixels

    m = torch.zeros(4, 4, dtype=torch.float64)
    m[0, :3] = 1.0
    assert region_pixels(m).tolist() == [[0, 0], [0, 1], [0, 2]]
    # area: each 2x2 cell holds the covered fraction
    area = area_resize(m[None, None], (2, 2))[0, 0]
    assert area.tolist() == [[0.5, 0.25], [0.0, 0.0]]
    assert torch.equal(area_resize(m[None, None], (4, 4))[0, 0], m)  # same size: identity
    # nearest display: each cell covers its 2x2 pixels exactly
    assert torch.equal(cells_to_image(area, (4, 4)),
                       area.float().repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert as_mask(np.ones((1, 3, 3), dtype=bool)).dtype == torch.float64
    for bad, msg in ((torch.ones(2, 3, 3), "one channel"), (torch.full((3, 3), 2.0), r"\[0, 1\]"),
                     (torch.full((3, 3), float("nan")), "NaN"), ("m.png", "numpy array"),
                     (torch.ones(3, 3, dtype=torch.long), "floats")):
        with pytest.raises(InputError, match=msg):
            as_mask(bad)
    with pytest.raises(InputError, match="is 3x3 .* but the model's images are 4x4"):
        as_mask(torch.ones(3, 3), (4, 4))
    with pytest.raises(InputError, match="region is empty"):
        region_pixels(torch.zeros(3, 3))


@pytest.mark.parametrize("mode", FIT_MODES)
def test_fit_pull_back_takes_the_model_pixel_each_input_pixel_maps_to(mode: str) -> None:
    _, fit = fit_tensor(torch.zeros(1, 1, 40, 80), (32, 32), mode)
    assert Fit.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit
    values = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    back = fit.pull_back(values, fill=-1.0)
    assert back.shape == (40, 80)
    cut = 0
    for r in range(40):
        for c in range(80):
            try:
                mr, mc = fit.map_pixel((r, c))
            except InputError:  # the fit cut this pixel away: it gets the fill value
                assert back[r, c] == -1.0
                cut += 1
                continue
            assert back[r, c] == values[mr, mc], (r, c)
    assert (cut > 0) == (mode == "crop")
    with pytest.raises(InputError, match="32x32"):
        fit.pull_back(np.zeros((16, 16)))
