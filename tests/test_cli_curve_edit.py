"""CLI for the curve-matching tasks: transfer, remove, adjust-saliency, blend."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from diffgeo.cli import app

os.environ["HF_HUB_OFFLINE"] = "1"
ENV = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
FAST = ["--steps", "10", "--t", "500", "--iterations", "3", "--fit", "crop"]


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    m = np.zeros((20, 30), np.uint8)
    m[6:14, 10:20] = 255
    path = tmp_path_factory.mktemp("mask") / "mask.png"
    Image.fromarray(m).save(path)
    return path


@pytest.mark.parametrize("verb, extra", [
    ("transfer", ["--reference", "2,12"]),
    ("remove", []),
    ("remove", ["--reference", "2,12"]),
    ("adjust-saliency", ["--increase"]),
    ("adjust-saliency", ["--decrease", "--mode", "faithful"]),
    ("blend", []),
    ("remove", ["--paper-decode", "--t-blend", "300"]),
    ("remove", ["--pixels-per-iteration", "2"]),
    ("remove", ["--match-outside-stats"]),
    ("adjust-saliency", ["--increase", "--lambda1", "10", "--feature-weight", "0",
                         "--refresh-every", "2", "--blend-every", "2"]),
    ("remove", ["--refresh-drift", "1e-9"]),
    ("remove", ["--pairs-per-jvp", "3", "--walk-dtype", "bfloat16", "--derivative", "exact"]),
])
def test_verbs_write_their_results(cli, tiny, image, mask_file, tmp_path, verb, extra):
    out = tmp_path / "out"
    r = cli.invoke(app, [verb, str(image), "--model", str(tiny), "--mask", str(mask_file),
                         *FAST, "--snapshot-every", "2", "--out", str(out), *extra], env=ENV)
    assert r.exit_code == 0, r.output
    for name in ("result.png", "strip.png", "curves.png", "history.csv", "settings.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "settings.json").read_text())
    pairs = 2 if "--pixels-per-iteration" in extra else 1 if "faithful" in extra else 4
    assert s["curve_matching"]["pixels_per_iteration"] == pairs
    assert s["curve_matching"]["match_outside_stats"] == ("--match-outside-stats" in extra)
    tuned = "--lambda1" in extra
    assert s["curve_matching"]["lambda1"] == (10 if tuned else 50)
    assert s["curve_matching"]["feature_weight"] == (0 if tuned else 1)
    assert s["curve_matching"]["refresh_every"] == (2 if tuned else 50)
    drift = "--refresh-drift" in extra
    # the resolved tolerance: the mode's default unless given
    tolerance = 1e-9 if drift else 0.0 if "faithful" in extra else 0.05
    assert s["curve_matching"]["refresh_drift"] == tolerance
    assert s["curve_matching"]["refreshes"] == (1 if tuned else 0)
    rows = list(csv.DictReader((out / "history.csv").open()))  # one row per pair
    rewalked = {int(r["iteration"]) for r in rows if r["rewalked"] == "True"}
    drift_at = {int(r["iteration"]): float(r["drift"]) for r in rows}
    every = 2 if tuned else 50
    # a drift re-walk: past the tolerance on an iteration without a periodic refresh (with
    # 1e-9, every iteration after the first)
    assert rewalked == {i for i in (1, 2) if i % every and tolerance
                        and drift_at[i] > tolerance}
    assert not drift or rewalked == {1, 2}
    assert s["curve_matching"]["drift_refreshes"] == len(rewalked)
    assert s["curve_matching"]["blend_every"] == (2 if tuned else 70)
    assert len(rows) == 3 * pairs and all(np.isfinite(float(row["loss"])) for row in rows)
    assert float(rows[0]["drift"]) == 0.0 and all(float(row["drift"]) >= 0 for row in rows)
    assert sorted({int(row["iteration"]) for row in rows}) == [0, 1, 2]
    assert s["curve_matching"]["iterations"] == 3
    assert s["curve_matching"]["decode_blend"] == ("--paper-decode" not in extra)
    assert s["curve_matching"]["t_blend"] == (300 if "--t-blend" in extra else 500)
    assert s["curve_matching"]["pairs_per_jvp"] == (3 if "--pairs-per-jvp" in extra else None)
    assert s["curve_matching"]["walk_dtype"] == ("bfloat16" if "--walk-dtype" in extra
                                                 else None)
    # the resolved derivative: fast mode differences unless told otherwise
    assert s["curve_matching"]["derivative"] == (
        "exact" if "--derivative" in extra or "faithful" in extra else "difference")
    # input, one snapshot (iteration 2), result
    assert Image.open(out / "strip.png").size == (3 * 16 + 2 * 2, 16)


@pytest.mark.parametrize("verb, extra, message", [
    ("transfer", ["--mask", "MASK"], "--reference"),
    ("adjust-saliency", ["--mask", "MASK"], "exactly one of --increase"),
    ("remove", [], "exactly one region"),
    ("remove", ["--mask", "MASK", "--mode", "quick"], "mode must be"),
    ("transfer", ["--mask", "MASK", "--reference", "2,0"], "--reference"),
    ("blend", ["--mask", "MASK", "--t-blend", "-5"], "--t-blend"),
    ("remove", ["--mask", "MASK", "--pixels-per-iteration", "0"], "--pixels-per-iteration"),
    ("adjust-saliency", ["--mask", "MASK", "--increase", "--lambda1", "0"], "--lambda1"),
    ("blend", ["--mask", "MASK", "--feature-weight", "-1"], "--feature-weight"),
    ("remove", ["--mask", "MASK", "--refresh-every", "0"], "--refresh-every"),
    ("remove", ["--mask", "MASK", "--refresh-drift", "-1"], "--refresh-drift"),
    ("remove", ["--mask", "MASK", "--pairs-per-jvp", "0"], "--pairs-per-jvp"),
    ("remove", ["--mask", "MASK", "--walk-dtype", "float64"], "--walk-dtype"),
    ("remove", ["--mask", "MASK", "--derivative", "jvp"], "--derivative"),
    ("remove", ["--mask", "MASK", "--mode", "faithful", "--refresh-drift", "0.1"],
     "fast mode only"),
])
def test_bad_inputs(cli, tiny, image, mask_file, tmp_path, verb, extra, message):
    extra = [str(mask_file) if e == "MASK" else e for e in extra]
    r = cli.invoke(app, [verb, str(image), "--model", str(tiny), *FAST, "--out",
                         str(tmp_path / "o"), *extra], env=ENV)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_curve_tasks_run_in_batch_and_evaluate(tiny, image, mask_file, tmp_path):
    from diffgeo.batch import run_batch
    from diffgeo.evaluate import evaluate_results

    common = {"image": str(image), "model": str(tiny), "mask": str(mask_file), "t": 500,
              "steps": 10, "iterations": 2, "fit": "crop"}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"verb": "remove", **common}) + "\n"
                    + json.dumps({"verb": "adjust-saliency", "increase": True, **common})
                    + "\n")
    summary = run_batch(jobs, tmp_path / "res")
    assert summary.count("done") == 2, summary.line()
    table = evaluate_results(tmp_path / "res")
    tasks = {row["task"] for row in table}
    assert {"remove", "adjust-saliency"} <= tasks
    metrics = {(row["task"], row["metric"]) for row in table}
    assert ("remove", "mse_inside") in metrics or ("remove", "mse") in metrics


@pytest.mark.parametrize("verb, extra", [("remove", []), ("adjust-saliency", ["--increase"])])
def test_verbs_take_a_prompt_on_a_latent_model(cli, sd_path, image, tmp_path, verb, extra):
    out = tmp_path / "out"
    # SD's scheduler has steps_offset=1: its 10-step grid is 1, 101, ..., 901 (diffusers').
    r = cli.invoke(app, [verb, str(image), "--model", str(sd_path), "--box", "4,4,10,10",
                         *FAST, "--t", "501", "--prompt", "a red cube", "--out", str(out),
                         *extra], env=ENV)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "settings.json").read_text())
    assert s["prompt"] == "a red cube"
    assert Image.open(out / "result.png").size == (16, 16)


def test_a_prompt_on_an_unconditional_model_is_refused(cli, tiny, image, tmp_path):
    r = cli.invoke(app, ["remove", str(image), "--model", str(tiny), "--box", "4,4,10,10",
                         *FAST, "--prompt", "a cat", "--out", str(tmp_path / "o")], env=ENV)
    assert r.exit_code == 2, r.output
    assert "takes no prompt" in r.output and "Traceback" not in r.output
