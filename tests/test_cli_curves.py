"""CLI tests of the ``curves`` and ``saliency-map`` verbs on a tiny pixel model folder."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _assert_user_error
from PIL import Image
from typer.testing import CliRunner

from diffgeo import sampling, verbs
from diffgeo.backbones import load_backbone
from diffgeo.cli import app
from diffgeo.curves import DEFINITIONS, generation_curves, pixel_component
from diffgeo.io import load_image
from diffgeo.maps import RateMaps, saliency_map

ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "HF_HUB_OFFLINE": "1"}
STEPS = 10
GRID = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]  # the 10-step grid, up to its top
CURVES_FILES = {"curves.png", "curves.csv", "curves.npz", "settings.json"}
SALIENCY_FILES = {"saliency.png", "rate_maps.npz", "settings.json"}

# The 20x30 (HxW) image is fitted to the 16x16 model with --fit crop: scale 16/20 = 0.8 (the
# width becomes 24), then 4 columns are cropped on each side. An input pixel (r, c) lands on
# ((r + 0.5)·0.8 - 0.5, (c + 0.5)·0.8 - 4 - 0.5), rounded to the nearest model pixel:
PIXELS = {(5, 10): (4, 4), (13, 15): (10, 8)}  # (3.9, 3.9) and (10.3, 7.9)
ROW, ROW_MODEL = 8, 6  # 6.3
COL, COL_MODEL = 14, 7  # 7.1
BOX = (6, 11, 10, 17)  # r0, c0, r1, c1 (exclusive) in input pixels: 4x5 model cells
OUTSIDE = (10, 2)  # column 2 -> -2.5: cropped away


def _invoke(cli: CliRunner, args: list):
    return cli.invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="module")
def mask(tmp_path_factory) -> Path:
    """A mask drawn on the 20x30 image covering exactly BOX (white = region)."""
    m = np.zeros((20, 30), dtype=np.uint8)
    r0, c0, r1, c1 = BOX
    m[r0:r1, c0:c1] = 255
    path = tmp_path_factory.mktemp("mask") / "mask.png"
    Image.fromarray(m).save(path)
    return path


def _curves_args(image: Path, model: Path, out: Path, *extra) -> list:
    return ["curves", image, "--model", model, "--steps", STEPS, "--fit", "crop", "--out", out,
            *extra]


def _saliency_args(image: Path, model: Path, out: Path, *extra) -> list:
    return ["saliency-map", image, "--model", model, "--steps", STEPS, "--fit", "crop",
            "--out", out, *extra]


def _components(mask: Path) -> list:
    # No --row here: see test_row_and_column_through_a_crop (a bug in the old curves verb).
    (p1, _), (p2, _) = PIXELS.items()
    return ["--pixel", f"{p1[0]},{p1[1]}", "--pixel", f"{p2[0]},{p2[1]}", "--col", COL,
            "--box", ",".join(map(str, BOX)), "--mask", mask]


LABELS = [f"pixel ({r},{c})" for r, c in PIXELS.values()] + [f"column {COL_MODEL}", "mask",
                                                              "box"]


def _read_csv(path: Path) -> tuple[list[str], list[list[float]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [[float(v) for v in r] for r in rows[1:]]


# ------------------------------------------------------------------------------ curves


@pytest.fixture(scope="module")
def curves_h(cli, tiny, image, mask, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curves") / "h"
    result = _invoke(cli, _curves_args(image, tiny, out, *_components(mask), "--definition", "h"))
    assert result.exit_code == 0, result.output
    assert "fluctuation" in result.stdout
    return out


def test_curves_writes_csv_npz_png_and_settings(curves_h, image):
    assert {p.name for p in curves_h.iterdir()} == CURVES_FILES
    header, rows = _read_csv(curves_h / "curves.csv")
    assert header == ["t"] + [f"h:{lab}" for lab in LABELS]
    assert [int(r[0]) for r in rows] == GRID  # one row per grid timestep
    assert all(len(r) == 1 + len(LABELS) for r in rows)
    vals = np.array([r[1:] for r in rows])
    assert np.isfinite(vals).all() and (vals > 0).all()

    s = json.loads((curves_h / "settings.json").read_text())
    assert s["verb"] == "curves" and s["definition"] == "h"
    assert s["image"] == str(image) and s["fit"]["mode"] == "crop"
    assert s["t"] == GRID[-1] and s["num_steps"] == STEPS
    assert s["components"] == LABELS  # pixel, row and column mapped through the crop
    # settings.json is written with sorted keys.
    assert list(s["fluctuation"]) == ["h"]
    assert sorted(s["fluctuation"]["h"]) == sorted(LABELS)  # one entry per component
    assert all(math.isfinite(f) and f >= 0 for f in s["fluctuation"]["h"].values())

    with np.load(curves_h / "curves.npz") as z:
        assert z["timesteps"].tolist() == GRID
        assert z["values_h"].shape == (len(LABELS), len(GRID))
        # The CSV holds the same numbers as the NPZ (columns = components).
        np.testing.assert_allclose(vals.T, z["values_h"], rtol=1e-6)
        # The mask file covers exactly the box: the two regions have the same curve.
        np.testing.assert_array_equal(z["values_h"][LABELS.index("mask")],
                                      z["values_h"][LABELS.index("box")])
    png = np.asarray(Image.open(curves_h / "curves.png"))
    assert png.ndim == 3 and png.shape[0] > 16


def test_curves_npz_equals_the_python_api(curves_h, tiny, image, mask):
    res = verbs.run("curves", image=image, model=str(tiny), pixel=tuple(PIXELS), mask=mask,
                    box=BOX, col=(COL,), definition="h", steps=STEPS, fit="crop")
    c = res.curves["h"]
    assert c.labels == LABELS and c.timesteps == GRID
    with np.load(curves_h / "curves.npz") as z:
        np.testing.assert_allclose(z["values_h"], c.values.numpy(), rtol=1e-6, atol=0)
    saved = json.loads((curves_h / "settings.json").read_text())["fluctuation"]["h"]
    for lab, f in res.settings["fluctuation"]["h"].items():
        assert saved[lab] == pytest.approx(f, rel=1e-6)


def test_curves_pixel_is_the_fitted_model_pixel(curves_h, tiny, image):
    """The --pixel curve is the generation curve of the model pixel the input pixel maps to,
    computed here without the CLI from the same fitted image."""
    bb = load_backbone(tiny)
    x, _ = load_image(image, size=bb.image_size, fit="crop")
    inv = sampling.invert(bb, x.to(bb.dtype), GRID[-1], STEPS)
    comps = [pixel_component(bb, p) for p in PIXELS.values()]
    c = generation_curves(bb, inv, comps, "h")
    with np.load(curves_h / "curves.npz") as z:
        np.testing.assert_allclose(z["values_h"][:2], c.values.numpy(), rtol=1e-5)
    # ... and not that of the unmapped coordinates.
    (r, col), _ = next(iter(PIXELS.items()))
    wrong = generation_curves(bb, inv, [pixel_component(bb, (r, col))], "h").values
    assert not torch.allclose(wrong[0], c.values[0], rtol=1e-3)


def test_curves_definition_all(cli, tiny, image, tmp_path):
    out = tmp_path / "all"
    (p, _) = next(iter(PIXELS.items()))
    result = _invoke(cli, _curves_args(image, tiny, out, "--pixel", f"{p[0]},{p[1]}", "--col",
                                       COL, "--definition", "all", "--k", 2))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == CURVES_FILES | {"definitions.png"}
    labels = LABELS[:1] + [f"column {COL_MODEL}"]
    header, rows = _read_csv(out / "curves.csv")
    assert header == ["t"] + [f"{d}:{lab}" for d in DEFINITIONS for lab in labels]
    assert len(header) == 1 + 4 * len(labels)  # 4x the columns of one definition
    assert [int(r[0]) for r in rows] == GRID
    s = json.loads((out / "settings.json").read_text())
    assert sorted(s["fluctuation"]) == sorted(DEFINITIONS)  # (written with sorted keys)
    assert all(sorted(per) == sorted(labels) for per in s["fluctuation"].values())
    with np.load(out / "curves.npz") as z:
        vals = np.array([r[1:] for r in rows]).T.reshape(4, len(labels), len(GRID))
        for i, d in enumerate(DEFINITIONS):
            assert z[f"values_{d}"].shape == (len(labels), len(GRID))
            np.testing.assert_allclose(vals[i], z[f"values_{d}"], rtol=1e-6)
            assert np.isfinite(z[f"values_{d}"]).all()


def test_curves_pixel_outside_the_crop(cli, tiny, image, tmp_path):
    out = tmp_path / "o"
    result = _invoke(cli, _curves_args(image, tiny, out, "--pixel", f"{OUTSIDE[0]},{OUTSIDE[1]}"))
    _assert_user_error(result, "--pixel (10, 2)", "outside the part of the input the model sees",
                       "--fit pad")
    assert not (out / "curves.csv").exists()


@pytest.mark.parametrize("what", ["row-on-wide-image", "col-on-tall-image"])
def test_row_and_column_through_a_crop(cli, tiny, image, tmp_path, what):
    if what == "row-on-wide-image":
        img, flag, value, label = image, "--row", ROW, f"row {ROW_MODEL}"
    else:  # the 20x30 image turned to 30x20: the rows are cropped, column COL -> ROW's place
        img = tmp_path / "tall.png"
        Image.open(image).transpose(Image.Transpose.TRANSPOSE).save(img)
        flag, value, label = "--col", ROW, f"column {ROW_MODEL}"
    out = tmp_path / "o"
    result = _invoke(cli, _curves_args(img, tiny, out, flag, value))
    assert result.exit_code == 0, result.output
    s = json.loads((out / "settings.json").read_text())
    assert s["components"] == [label]


# ------------------------------------------------------------------------------ saliency-map

PROBES = 8


@pytest.fixture(scope="module")
def saliency_probe(cli, tiny, image, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saliency") / "probe"
    result = _invoke(cli, _saliency_args(image, tiny, out, "--probes", PROBES))
    assert result.exit_code == 0, result.output
    return out


def test_saliency_map_writes_maps_and_settings(saliency_probe, image):
    assert {p.name for p in saliency_probe.iterdir()} == SALIENCY_FILES
    s = json.loads((saliency_probe / "settings.json").read_text())
    assert s["verb"] == "saliency-map" and s["image"] == str(image)
    assert s["definition"] == "h" and s["estimator"] == "probe" and s["probes"] == PROBES
    assert s["relative_std_per_cell"] == pytest.approx(math.sqrt(1 / (2 * PROBES)))
    with np.load(saliency_probe / "rate_maps.npz") as z:
        ts, maps, sal = z["timesteps"], z["maps"], z["saliency"]
    assert ts.tolist() == GRID
    assert maps.shape == (len(GRID), 16, 16) and sal.shape == (16, 16)
    assert np.isfinite(maps).all() and (maps > 0).all()
    # The saliency map is the fluctuation of every cell's rate curve.
    expect = saliency_map(RateMaps(GRID, torch.from_numpy(maps), "h", "probe"), 5, 200)
    np.testing.assert_allclose(sal, expect.numpy(), rtol=1e-5, atol=1e-12)
    png = np.asarray(Image.open(saliency_probe / "saliency.png"))
    assert png.ndim == 3 and png.shape[0] > 16


def test_saliency_map_gram_exact(cli, tiny, image, tmp_path):
    out = tmp_path / "gram"
    result = _invoke(cli, _saliency_args(image, tiny, out, "--estimator", "gram",
                                         "--definition", "exact", "--k", 2))
    assert result.exit_code == 0, result.output
    assert "estimator gram" in result.stdout
    s = json.loads((out / "settings.json").read_text())
    assert s["estimator"] == "gram" and s["definition"] == "exact" and s["k"] == 2
    assert s["relative_std_per_cell"] == 0.0
    with np.load(out / "rate_maps.npz") as z:
        assert z["maps"].shape == (len(GRID), 16, 16) and z["saliency"].shape == (16, 16)
        assert np.isfinite(z["maps"]).all()


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("case", ["no-component", "definition-curves", "definition-saliency",
                                  "gram-with-h", "pixel-3-values", "box-reversed", "probes-0"])
def test_bad_inputs(cli, tiny, image, tmp_path, case):
    out = tmp_path / "out"
    if case == "no-component":
        args, frags = _curves_args(image, tiny, out), ["at least one component", "--pixel"]
    elif case == "definition-curves":
        args = _curves_args(image, tiny, out, "--pixel", "5,10", "--definition", "bogus")
        frags = ["definition", "'bogus'"]
    elif case == "definition-saliency":
        args, frags = _saliency_args(image, tiny, out, "--definition", "bogus"), ["'bogus'"]
    elif case == "gram-with-h":
        args = _saliency_args(image, tiny, out, "--estimator", "gram", "--definition", "h")
        frags = ["gram", "projected"]
    elif case == "pixel-3-values":
        args, frags = _curves_args(image, tiny, out, "--pixel", "1,2,3"), ["--pixel", "1,2,3"]
    elif case == "box-reversed":
        args, frags = _curves_args(image, tiny, out, "--box", "5,5,2,2"), ["--box", "R0 < R1"]
    else:
        args, frags = _saliency_args(image, tiny, out, "--probes", "0"), ["probes", ">= 1"]
    _assert_user_error(_invoke(cli, args), *frags)
    assert not out.exists() or list(out.iterdir()) == []  # nothing written


@pytest.mark.parametrize("verb", ["curves", "saliency-map"])
def test_existing_output_needs_force(cli, tiny, image, curves_h, saliency_probe, verb):
    if verb == "curves":
        out, args = curves_h, _curves_args(image, tiny, curves_h, "--pixel", "5,10")
    else:
        out, args = saliency_probe, _saliency_args(image, tiny, saliency_probe)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    _assert_user_error(_invoke(cli, args), "exists", "--force")
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert after == before  # untouched, no temporary files left behind
