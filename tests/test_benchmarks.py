"""The scripts under benchmarks/, benchmarks/recipes/ and scripts/ (not part of the package):
every one answers ``--help`` (so its imports and argument parser work against the current API),
and each runs end to end with its smallest settings in a temporary folder, checked by what it
writes (files present, numbers finite, a few values that must hold whatever the timing).

Each script runs in a subprocess, offline (``HF_HUB_OFFLINE=1``), in a temporary working
directory. The cheap runs are in the default test run; the ones that take more than ~10 s on a
2-core CPU are marked ``slow`` (``pytest -m slow tests/test_benchmarks.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import save_box_mask, save_rgb
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for pattern in
                 ("benchmarks/*.py", "benchmarks/recipes/*.py", "scripts/*.py")
                 for p in ROOT.glob(pattern))
# Modules the scripts import (no argparse): `--help` only imports them.
HELPERS = {"benchmarks/random_sd.py", "benchmarks/recipes/_common.py"}
# Every script with an end-to-end test below (test_every_script_has_a_smoke_test keeps it so).
SMOKE_TESTED = {
    "benchmarks/curve_matching_gates.py", "benchmarks/curve_matching_speed.py",
    "benchmarks/jacobian_cost.py", "benchmarks/pixels_overhead.py", "benchmarks/rate_maps.py",
    "benchmarks/rbe_discovery.py", "benchmarks/tangent_accuracy.py",
    "benchmarks/recipes/cat2000_saliency.py", "benchmarks/recipes/celebahq_regions.py",
    "benchmarks/recipes/emu_edit_removal.py", "benchmarks/recipes/heldout_scenes.py",
    "benchmarks/recipes/iharmony4_blending.py", "benchmarks/recipes/imagenet_exemplars.py",
    "scripts/build_scenes.py", "scripts/evaluate_default_model.py", "benchmarks/ui_latency.py",
    "scripts/ui_screenshots.py", "benchmarks/gpu_suite.py", "benchmarks/flow_blocks.py",
}
DATA_RECIPES = ("cat2000_saliency", "celebahq_regions", "emu_edit_removal",
                "iharmony4_blending", "imagenet_exemplars")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error",
               TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def run(script: str, *args: Any, cwd: Path, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"{script} exited {proc.returncode}\n--- stdout\n"
                                      f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def numbers(obj: Any) -> list[float]:
    """Every int/float in a JSON value (bools excluded)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in numbers(x)]
    if isinstance(obj, list | tuple):
        return [v for x in obj for v in numbers(x)]
    raise TypeError(type(obj))


def assert_finite(obj: Any, what: str) -> None:
    vals = numbers(obj)
    assert vals, f"{what}: no numbers"
    bad = [v for v in vals if not math.isfinite(v)]
    assert not bad, f"{what}: {len(bad)} non-finite of {len(vals)} numbers"


def read_json(path: Path) -> Any:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def evaluation_table(results: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """evaluation.json's rows by (task, metric), after checking every row is finite."""
    ev = read_json(results / "evaluation.json")
    rows = {(r["task"], r["metric"]): r for r in ev["table"]}
    assert rows, "empty evaluation table"
    for key, r in rows.items():
        assert r["n"] >= 1 and r["non_finite"] == 0, (key, r)
        assert math.isfinite(r["mean"]) and math.isfinite(r["std"]), (key, r)
    return rows


# ------------------------------------------------------------------------------- --help
@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """``--help`` of every script, a few at a time (each pays the torch import)."""
    cwd = tmp_path_factory.mktemp("help")
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        procs = pool.map(lambda s: run(s, "--help", cwd=cwd, timeout=120, check=False),
                         SCRIPTS)
        return dict(zip(SCRIPTS, procs, strict=True))


def test_scripts_are_found():
    assert len(SCRIPTS) >= 15 and HELPERS <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(helps, script):
    proc = helps[script]
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr
    if script in HELPERS:
        assert proc.stdout == ""  # a module: importing it prints nothing
    else:
        assert proc.stdout.startswith(f"usage: {Path(script).name}"), proc.stdout[:300]
        assert "--help" in proc.stdout


def test_every_script_has_a_smoke_test():
    assert set(SCRIPTS) - HELPERS == SMOKE_TESTED


# ------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", DATA_RECIPES)
def test_recipe_without_its_dataset_is_a_one_line_error(tmp_path, name):
    proc = run(f"benchmarks/recipes/{name}.py", "--data", tmp_path / "missing", "--out",
               tmp_path / "out", cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: --data ") and "\n" not in err, err
    assert str(tmp_path / "missing") in err
    assert not (tmp_path / "out").exists()


def test_cat2000_saliency(tmp_path):
    data = tmp_path / "CAT2000"
    save_rgb(data / "Stimuli" / "Action" / "001.jpg", 40, 40)
    (data / "FIXATIONMAPS" / "Action").mkdir(parents=True)
    ramp = np.linspace(0, 255, 1600).reshape(40, 40).astype(np.uint8)
    Image.fromarray(ramp).save(data / "FIXATIONMAPS" / "Action" / "001.jpg")
    out = tmp_path / "out"
    # 10 steps: the fluctuation needs >= 5 grid points above t = 200
    proc = run("benchmarks/recipes/cat2000_saliency.py", "--data", data, "--images", 1,
               "--steps", 10, "--out", out, cwd=tmp_path)
    res = read_json(out / "results.json")
    assert res["images"] == 1 and len(res["records"]) == 1 and res["steps"] == 10
    rec = res["records"][0]
    assert rec["f_salient"] >= 0 and rec["f_background"] >= 0
    assert res["fraction"] == float(rec["f_salient"] > rec["f_background"])
    assert_finite(res, "results.json")
    assert (out / "scatter.png").stat().st_size > 0
    assert "salient pixel fluctuates more" in proc.stdout


def test_heldout_scenes(tmp_path):
    out = tmp_path / "out"
    proc = run("benchmarks/recipes/heldout_scenes.py", "--out", out, "--scenes", 1,
               "--steps", 10, cwd=tmp_path)
    assert "2 done" in proc.stdout and "0 failed" in proc.stdout
    rows = evaluation_table(out / "results")
    assert {task for task, _ in rows} == {"invert", "exemplar"}
    # exact inversion then generation on the same grid reproduces the scene
    assert rows[("invert", "psnr")]["mean"] > 40
    assert 0 < rows[("exemplar", "mse")]["mean"] < 1


def test_imagenet_exemplars(tmp_path):
    data = tmp_path / "val"
    for k in range(2):
        save_rgb(data / "n01440764" / f"ILSVRC2012_val_{k}.JPEG", 20 + k, 24, seed=k)
    out = tmp_path / "out"
    proc = run("benchmarks/recipes/imagenet_exemplars.py", "--data", data, "--limit", 1,
               "--steps", 10, "--out", out, cwd=tmp_path)
    assert "1 done" in proc.stdout and "paper:" in proc.stdout
    rows = evaluation_table(out / "results")
    assert {task for task, _ in rows} == {"exemplar"}
    assert (out / "results" / "pair-00000" / "result.png").is_file()


@pytest.mark.slow
def test_emu_edit_removal(tmp_path):
    data = tmp_path / "emu"
    save_rgb(data / "images" / "0.png")
    save_box_mask(data / "masks" / "0.png")
    (data / "index.jsonl").write_text(json.dumps(
        {"id": "e0", "image": "images/0.png", "mask": "masks/0.png",
         "instruction": "remove it"}) + "\n")
    out = tmp_path / "out"
    proc = run("benchmarks/recipes/emu_edit_removal.py", "--data", data, "--limit", 1,
               "--steps", 10, "--iterations", 2, "--out", out, cwd=tmp_path)
    assert "1 done" in proc.stdout
    rows = evaluation_table(out / "results")
    assert {"psnr", "mse", "mse_inside", "mse_outside"} <= {m for t, m in rows if t == "remove"}


@pytest.mark.slow
def test_iharmony4_blending(tmp_path):
    data = tmp_path / "iHarmony4"
    save_rgb(data / "HCOCO" / "composite_images" / "c1_1_1.jpg")
    save_box_mask(data / "HCOCO" / "masks" / "c1_1.png")
    save_rgb(data / "HCOCO" / "real_images" / "c1.jpg")
    (data / "HCOCO" / "HCOCO_test.txt").write_text("c1_1_1.jpg\n")
    out = tmp_path / "out"
    proc = run("benchmarks/recipes/iharmony4_blending.py", "--data", data, "--limit", 1,
               "--steps", 10, "--iterations", 2, "--out", out, cwd=tmp_path)
    assert "1 done" in proc.stdout
    rows = evaluation_table(out / "results")
    assert {t for t, _ in rows} == {"blend"}


@pytest.mark.slow
def test_celebahq_regions(tmp_path):
    data = tmp_path / "CelebAMask-HQ"
    save_rgb(data / "CelebA-HQ-img" / "0.jpg", 32, 32)
    save_box_mask(data / "CelebAMask-HQ-mask-anno" / "0" / "00000_mouth.png", 16, 16,
                  box=(11, 5, 13, 11))
    out = tmp_path / "out"
    proc = run("benchmarks/recipes/celebahq_regions.py", "--data", data, "--limit", 1,
               "--steps", 10, "--k", 1, "--regions", "mouth", "--out", out, cwd=tmp_path)
    assert proc.stdout.count("1 done") == 2  # directions, then apply
    rows = evaluation_table(out / "results")
    assert {t for t, _ in rows} == {"apply (α=-30)", "apply (α=30)"}


# ------------------------------------------------------------------------------- scripts/
def test_build_scenes_reproduces_the_bundled_scenes(tmp_path):
    from diffgeo.data.scenes import find_emoji_font

    if find_emoji_font() is None:
        pytest.skip("no emoji font: the bundled scenes cannot be rebuilt here")
    out = tmp_path / "scenes"
    run("scripts/build_scenes.py", "--out", out, cwd=tmp_path, timeout=120)
    bundled = ROOT / "src" / "diffgeo" / "assets" / "scenes"
    assert json.loads((out / "heldout-32.json").read_text()) == json.loads(
        (bundled / "heldout-32.json").read_text())
    with np.load(out / "heldout-32.npz") as a, np.load(bundled / "heldout-32.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_evaluate_default_model(tmp_path):
    """On a copy of the shipped model (the script writes its card into the model folder)."""
    from diffgeo.backbones import default_model_path

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    for name in ("README.md", "metrics.json", "samples.png", "samples-eta1.png"):
        (model / name).unlink(missing_ok=True)
    run("scripts/evaluate_default_model.py", model, "--scenes", 2, "--samples", 2,
        cwd=tmp_path, timeout=600)
    m = read_json(model / "metrics.json")
    assert_finite(m, "metrics.json")
    assert m["scenes"] == 2 and m["saliency_scenes"] == 2 and 0 <= m["saliency_agreement"] <= 1
    plain = [k for k in m if k.startswith("psnr_t") and k.endswith("_plain")]
    assert len(plain) == 2
    for k in plain:  # the exact inversion round-trips at least as well as the plain one
        assert m[k.replace("_plain", "_exact")] >= m[k] > 10, (k, m)
    for name in ("samples.png", "samples-eta1.png"):
        assert Image.open(model / name).size[0] > 0
    card = (model / "README.md").read_text()
    assert "# diffgeo default model" in card and "nan" not in card.lower()


# ------------------------------------------------------------------------------- benchmarks
def test_rate_maps(tmp_path):
    out = tmp_path / "rate_maps.json"
    run("benchmarks/rate_maps.py", "--models", "random64", "--size", 16, "--threads", 1,
        "--pixels-subset", 8, "--steps", 10, "--t", 500, "--k", 1, "--oversample", 1,
        "--probes", 2, "--json", out, cwd=tmp_path)
    rep = read_json(out)
    (res,) = rep["results"]
    assert res["model"] == "random64" and res["t"] == 500 and res["t_prev"] == 400
    assert res["loop_cells"] == 8 and res["cells"] == 256
    rows = {(r["definition"], r["estimator"]): r for r in res["rows"]}
    assert set(rows) == {("exact", "gram"), ("eps", "gram"), ("h-proj", "gram"),
                         ("h", "probe"), ("h", "lowrank")}
    assert_finite(res["rows"], "rows")
    for r in res["rows"]:
        assert r["seconds"] > 0 and r["loop_seconds"] > 0 and r["loop_extrapolated"]
    # given the same basis, the Gram form and the per-pixel loop compute the same map
    for d in ("exact", "eps", "h-proj"):
        assert rows[(d, "gram")]["errors"]["max"] < 1e-4, rows[(d, "gram")]["errors"]


@pytest.mark.slow
def test_jacobian_cost(tmp_path):
    out = tmp_path / "jacobian_cost.json"
    run("benchmarks/jacobian_cost.py", "--reps", 1, "--k", 1, "--threads", 1, "--json", out,
        cwd=tmp_path)
    rep = read_json(out)
    models = [k for k in rep if k.startswith(("pixel", "latent"))]
    assert len(models) == 2
    for label in models:
        assert len(rep[label]) == 8
        assert_finite(rep[label], label)
        assert rep[label]["forward eps (fast kernels)"]["x_forward"] == 1.0
        assert all(r["seconds"] > 0 for r in rep[label].values())


@pytest.mark.slow
def test_pixels_overhead(tmp_path):
    out = tmp_path / "pixels_overhead.json"
    proc = run("benchmarks/pixels_overhead.py", "--reps", 1, "--steps", 5, "--json", out,
               cwd=tmp_path)
    rep = read_json(out)
    assert_finite({k: v for k, v in rep.items() if k != "setup"}, "summary")
    for method in ("img2img", "pixels"):
        assert rep[method]["seconds"] > 0 and rep[method]["unet_calls"] >= 1
        assert rep[method]["peak_mb"] > 0
    assert "PIXELS overhead" in proc.stdout


@pytest.mark.slow
def test_tangent_accuracy(tmp_path):
    out = tmp_path / "tangent_accuracy.json"
    run("benchmarks/tangent_accuracy.py", "--threads", 1, "--steps", 2, "--k", 1,
        "--oversample", 1, "--passes", 1, "--ref-tol", 1e-3, "--ref-max-iter", 5,
        "--ref-oversample", 1, "--json", out, cwd=tmp_path, timeout=600)
    rep = read_json(out)
    assert len(rep["timesteps"]) == 2
    assert set(rep["summary"]) == {"reference", "reference s1", "cold default", "warm q1 p1",
                                   "warm tol p1", "cold q2 p1"}
    for name, s in rep["summary"].items():
        assert_finite({k: v for k, v in s.items() if v is not None}, name)
    assert rep["summary"]["reference"]["max_angle"] < 1e-6  # itself
    assert all(len(rows) == 2 for rows in rep["per_timestep"].values())


@pytest.mark.slow
def test_rbe_discovery(tmp_path):
    out = tmp_path / "rbe_discovery.json"
    run("benchmarks/rbe_discovery.py", "--reps", 1, "--passes", 1, "--json", out,
        cwd=tmp_path, timeout=600)
    rep = read_json(out)
    assert_finite(rep, "report")
    # the decoder-only products and the full U-Net with a hook are the same function
    assert rep["jvp_rel_diff"] < 1e-4
    for label in ("fixed_passes", "defaults_tol_1e-4"):
        e = rep[label]
        assert e["products"]["decoder_only"] == e["products"]["full_unet_hook"] > 0
        assert e["sv_max_rel_diff"] < 1e-3 and e["max_angle_masked_rad"] < 1e-3


@pytest.mark.slow
def test_curve_matching_speed(tmp_path):
    out = tmp_path / "curve_matching_speed.json"
    run("benchmarks/curve_matching_speed.py", "--scenes", 1, "--iterations", 2,
        "--refresh-every", 1, "--threads", 1, "--json", out, cwd=tmp_path, timeout=600)
    rep = read_json(out)
    (row,) = rep["rows"]
    assert set(row) == {"faithful/1", "fast/1 exact", "fast/1", "fast/4"}
    assert row["fast/1 exact"]["derivative"] == row["faithful/1"]["derivative"] == "exact"
    assert row["fast/1"]["derivative"] == row["fast/4"]["derivative"] == "difference"
    for v in row.values():
        assert len(v["losses"]) == 2 and v["seconds"] > 0
        cost = v["cost"]
        assert {"derivative", "backward", "update"} <= set(cost["per_iteration_forwards"])
        assert all(f >= 0 for f in cost["per_iteration_forwards"].values())
    # refreshing every iteration: iteration 1 walks the whole path; faithful mode walks to its
    # sampled levels every iteration on top of that
    path = row["fast/1"]["cost"]["path_steps"]
    assert row["fast/1"]["cost"]["walk_steps_per_iteration"] == path / 2
    assert row["faithful/1"]["cost"]["walk_steps_per_iteration"] > path / 2
    assert len(rep["forward_seconds"]) == len(row) and min(rep["forward_seconds"]) > 0
    assert [v["cost"]["forward_seconds"] for v in row.values()] == rep["forward_seconds"]
    for k, v in row.items():
        assert v["cost"]["loop_seconds_per_iteration"] == pytest.approx(
            sum(v["cost"]["per_iteration_seconds"].values()))
        if k != "faithful/1":
            ratio = row["faithful/1"]["cost"]["loop_seconds_per_iteration"] / v["cost"][
                "loop_seconds_per_iteration"]
            assert rep["summary"][k]["loop_speedup_per_iteration"] == pytest.approx(ratio)
            assert rep["summary"][k]["loop_speedup_per_pair"] == pytest.approx(
                ratio * (4 if k == "fast/4" else 1))
    assert_finite(rep["rows"], "rows")
    assert_finite(rep["summary"], "summary")


@pytest.mark.slow
def test_curve_matching_gates(tmp_path):
    out = tmp_path / "gates"
    run("benchmarks/curve_matching_gates.py", "--out", out, "--scenes", 1,
        "--removal-iterations", 2, "--repaint-resample", 1, "--saliency-iterations", 2,
        "--curve-steps", 10, "--mode-scenes", 1, "--mode-iterations", 2, "--refresh-every", 1,
        "--mode-variants", "faithful/1,fast/1", "--threads", 1, cwd=tmp_path, timeout=600)
    res = read_json(out / "results.json")
    assert set(res) >= {"removal", "saliency", "modes"}
    assert_finite(res["removal"]["summary"], "removal summary")
    assert len(res["removal"]["scenes"]) == 1 and len(res["saliency"]["scenes"]) == 1
    for name in ("summary.md", "removal.png", "saliency.png", "modes.png"):
        assert (out / name).stat().st_size > 0, name


def test_ui_latency(tiny, tmp_path):
    pytest.importorskip("gradio")
    out = tmp_path / "ui_latency.json"
    run("benchmarks/ui_latency.py", "--model", tiny, "--steps", 10, "--reps", 1, "--json", out,
        "--md", tmp_path / "ui_latency.md", cwd=tmp_path, timeout=300)
    rep = read_json(out)
    assert rep["image_size"] == [16, 16] and rep["steps"] == 10
    assert set(rep["seconds"]) == {"click-to-curve", "slider-to-image", "discover (once)"}
    for row in rep["seconds"].values():
        assert 0 < row["min"] <= row["median"] <= row["max"] and math.isfinite(row["max"])
    assert "| click-to-curve |" in (tmp_path / "ui_latency.md").read_text()


@pytest.mark.slow
def test_ui_screenshots(tiny, tmp_path):
    pytest.importorskip("playwright")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium on this machine")
    out = tmp_path / "shots"
    run("scripts/ui_screenshots.py", "--model", tiny, "--steps", 10, "--iterations", 2, "--out",
        out, cwd=tmp_path, timeout=300)
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "edit.png", "pixels.png",
                                                     "rbe.png"]
    proc = run("scripts/ui_screenshots.py", "--model", tiny, "--out", out, cwd=tmp_path,
               check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr  # nothing replaced unasked


def test_flow_blocks(tmp_path):
    out = tmp_path / "fb"
    run("benchmarks/flow_blocks.py", "--blocks", "0,2", "--t", 500, "--k", 2, "--oversample", 1,
        "--steps", 3, "--max-iter", 2, "--directions", 1, "--threads", 1, "--out", out,
        cwd=tmp_path)
    rep = read_json(out / "flow_blocks.json")
    assert rep["dtype"] == "float32" and rep["device"].startswith("cpu") and rep["date"]
    assert [m["model"] for m in rep["models"]] == ["tiny-sd3", "tiny-flux"]
    for m in rep["models"]:
        assert [r["block"] for r in m["rows"]] == [0, 2] and 0 < m["region_share"] < 1
        assert_finite(m["rows"], m["model"])
        for r in m["rows"]:
            sv = r["singular_values"]
            assert len(sv) == 2 and sv[0] >= sv[1] > 0, sv
            for key in ("locality_out", "locality_out_raw", "locality_x0"):
                assert 0 <= r[key] <= 1, (key, r[key])
            assert 0 < r["sigma"] < 1 and r["t"] in m["levels"]
    table = (out / "flow_blocks.md").read_text()
    assert "| model | block |" in table and rep["date"] in table
    assert table.count("| tiny-sd3 |") == 2 and table.count("| tiny-flux |") == 2
    assert "| tiny-flux | single-stream block 1 |" in table
