"""CLI for region-based editing: `diffgeo directions` and `diffgeo apply` on a tiny model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffgeo.cli import app
from diffgeo.train import build_unet, export_model

os.environ["HF_HUB_OFFLINE"] = "1"
ENV = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rbe-cli")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        export_model(build_unet("tiny-16"), root / "model")
    img = root / "img.png"
    Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype("uint8")).save(img)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 5:12] = 255
    Image.fromarray(mask).save(root / "mask.png")
    runner = CliRunner()
    out = root / "dirs"
    r = runner.invoke(app, ["directions", str(img), "--model", str(root / "model"), "--mask",
                            str(root / "mask.png"), "--t", "500", "--steps", "10", "--k", "2",
                            "--preview=-20,20", "--out", str(out)], env=ENV)
    assert r.exit_code == 0, r.output
    return root, img, out, runner


def test_directions_writes_vectors_previews_and_settings(setup):
    root, img, out, _ = setup
    for name in ("direction-0.png", "direction-1.png", "settings.json",
                 "directions/directions.safetensors", "directions/directions.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "settings.json").read_text())
    sv = s["singular_values"]
    assert len(sv) == 2 and sv[0] >= sv[1] > 0
    assert len(s["previews"]) == 2 and [p["strength"] for p in s["previews"][0]] == [-20, 20]
    # the preview strip holds the reconstruction then one image per strength, 2-px gaps
    assert Image.open(out / "direction-0.png").size == (3 * 16 + 2 * 2, 16)


def test_apply_matches_the_python_api_and_reports_locality(setup, tmp_path):
    root, img, out, runner = setup
    dest = tmp_path / "apply"
    r = runner.invoke(app, ["apply", str(img), "--model", str(root / "model"), "--directions",
                            str(out / "directions"), "--index", "1", "--strength=-20,0,20",
                            "--out", str(dest)], env=ENV)
    assert r.exit_code == 0, r.output
    s = json.loads((dest / "settings.json").read_text())
    assert [loc["strength"] for loc in s["locality"]] == [-20, 0, 20]
    zero = s["locality"][1]
    assert zero["mse_inside"] == 0 and zero["mse_outside"] == 0  # α = 0 is the reconstruction
    from diffgeo import verbs

    res = verbs.run("apply", image=img, directions=out / "directions", model=str(root / "model"),
                    index=1, strength=(20.0,))
    edited = np.asarray(Image.open(dest / "edit-2.png"), dtype=np.float32)
    ours = ((res.edit.images[0].permute(1, 2, 0).numpy() + 1) * 127.5)
    assert np.abs(edited - ours).max() <= 1.0  # PNG rounding


@pytest.mark.parametrize("extra, message", [
    (["--box", "1,1,5,5"], "exactly one region"),
    ([], "exactly one region"),
    (["--mask", "MASK", "--k", "0"], "k"),
    (["--mask", "MASK", "--t", "510"], "not on the"),
    (["--mask", "MASK", "--project", "sideways"], "project"),
    (["--mask", "MASK", "--preview", "a,b"], "--preview"),
])
def test_directions_bad_inputs(setup, tmp_path, extra, message):
    root, img, _, runner = setup
    extra = [str(root / "mask.png") if e == "MASK" else e for e in extra]
    if extra[:1] == ["--box"]:
        extra = ["--mask", str(root / "mask.png"), *extra]
    r = runner.invoke(app, ["directions", str(img), "--model", str(root / "model"), "--steps",
                            "10", "--out", str(tmp_path / "o"), *extra], env=ENV)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("extra, message", [
    (["--index", "7"], "out of range"),
    (["--strength", "x"], "--strength"),
    (["--window", "100"], "--window"),
    (["--mode", "both"], "mode"),
])
def test_apply_bad_inputs(setup, tmp_path, extra, message):
    root, img, out, runner = setup
    r = runner.invoke(app, ["apply", str(img), "--model", str(root / "model"), "--directions",
                            str(out / "directions"), "--out", str(tmp_path / "o"), *extra],
                      env=ENV)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
