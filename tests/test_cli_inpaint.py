"""CLI, batch and evaluate for the inpainting baselines (`diffgeo inpaint`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import _assert_user_error
from PIL import Image

from diffgeo.cli import app

os.environ["HF_HUB_OFFLINE"] = "1"
ENV = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """A 16x16 image (the tiny model's size: no fit) and a box inside it."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("inp") / "square.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("method", ["repaint", "mean-fill"])
def test_inpaint_fills_only_the_region(cli, tiny, square, tmp_path, method):
    out = tmp_path / method
    r = cli.invoke(app, ["inpaint", str(square), "--model", str(tiny), "--box", "4,5,10,12",
                         "--method", method, "--steps", "10", "--resample", "2",
                         "--out", str(out)], env=ENV)
    assert r.exit_code == 0, r.output
    for name in ("input.png", "result.png", "strip.png", "settings.json"):
        assert (out / name).is_file(), name
    before = np.asarray(Image.open(out / "input.png"), dtype=np.int16)
    after = np.asarray(Image.open(out / "result.png"), dtype=np.int16)
    region = np.zeros((16, 16), bool)
    region[4:10, 5:12] = True
    assert np.array_equal(before[~region], after[~region])
    assert np.abs(before[region] - after[region]).mean() > 5
    s = json.loads((out / "settings.json").read_text())
    assert s["method"] == method and s["region_pixels"] == 42
    assert s["locality"]["mse_outside"] < 1e-5 < s["locality"]["mse_inside"]
    if method == "mean-fill":
        assert len(np.unique(after[region].reshape(-1, 3), axis=0)) == 1


def test_inpaint_is_seeded(cli, tiny, square, tmp_path):
    outs = []
    for k, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"o{k}"
        r = cli.invoke(app, ["inpaint", str(square), "--model", str(tiny), "--box", "4,5,10,12",
                             "--steps", "5", "--resample", "1", "--seed", str(seed),
                             "--out", str(out)], env=ENV)
        assert r.exit_code == 0, r.output
        outs.append(np.asarray(Image.open(out / "result.png")))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("extra, fragment", [
    (["--box", "4,5,10,12", "--method", "blur"], "method must be one of"),
    ([], "exactly one region"),
    (["--box", "4,5,10,12", "--resample", "0"], "resample"),
])
def test_inpaint_bad_inputs(cli, tiny, square, tmp_path, extra, fragment):
    r = cli.invoke(app, ["inpaint", str(square), "--model", str(tiny), *extra,
                         "--out", str(tmp_path / "o")], env=ENV)
    _assert_user_error(r, fragment)


def test_inpaint_runs_in_batch_and_is_evaluated(tiny, square, tmp_path):
    from diffgeo.batch import run_batch
    from diffgeo.evaluate import evaluate_results

    jobs = tmp_path / "JOBS.jsonl"
    lines = [{"verb": "inpaint", "id": f"fill-{m}", "image": str(square), "model": str(tiny),
              "box": [4, 5, 10, 12], "method": m, "steps": 5, "resample": 1}
             for m in ("repaint", "mean-fill")]
    jobs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = run_batch(jobs, tmp_path / "results")
    assert summary.count("done") == 2, summary.line()
    table = evaluate_results(tmp_path / "results", force=True)
    rows = {(r["task"], r["metric"]): r for r in table}
    assert rows[("inpaint", "mse_outside")]["mean"] < 1e-5
    assert rows[("inpaint", "mse")]["n"] == 2
