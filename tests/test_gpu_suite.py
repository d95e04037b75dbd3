"""benchmarks/gpu_suite.py (issue 21) through its ``--smoke`` run on the CPU, and the launcher
scripts/gpu_bundle.sh that carries the suite to a GPU machine (its syntax and --help only: its
``build`` downloads wheels).

Thresholds of the correctness section, on the CPU in float32 / bfloat16:
- JVP vs central differences: the best of three steps is ~1e-4 here; with float32 rounding
  (~6e-8 relative) divided by steps of 1e-2..1e-3 the difference quotient itself is only good to
  ~1e-4, so 2e-3 leaves a 10x margin while a wrong derivative is off by O(1).
- The LayerNorm rewrite takes its statistics in float32 and rounds once to bfloat16, so every
  output is within half a bfloat16 ulp of the float64 value (plus float32 noise): at most one ulp
  of the largest output, as torch's fused kernel; in float32 the two agree to ~1e-6.
- The difference rate (fast mode's default derivative) within 1e-3 of the exact rate and 3e-3
  of its gradient, the bounds tests/test_rate_difference.py holds on the default model.
- Attention: the CPU's plain forward runs the fused flash kernel, derivative mode and the JVP the
  math one (autodiff.py forces it), so the check can tell them apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_benchmarks import ROOT, assert_finite, read_json, run

SUITE = "benchmarks/gpu_suite.py"
BUNDLE = ROOT / "scripts" / "gpu_bundle.sh"


def outputs(out: Path) -> tuple[Path, Path]:
    mds, jsons = sorted(out.glob("gpu-*.md")), sorted(out.glob("gpu-*.json"))
    assert len(mds) == 1 and len(jsons) == 1, sorted(p.name for p in out.iterdir())
    md, js = mds[0], jsons[0]
    assert md.stem == js.stem and md.stem.startswith("gpu-cpu-smoke-"), md.name
    return md, js


def check_correctness(e: dict) -> None:
    for output, r in e["jvp_vs_finite_differences"]["outputs"].items():
        assert r["best"] < 2e-3, (output, r)
    for name, r in e["difference_rate"]["settings"].items():
        # the bounds tests/test_rate_difference.py holds on the default model
        assert r["rate"] < 1e-3 and r["gradient"] < 3e-3, (name, r)
    ln = e["layer_norm_rewrite"]
    assert ln["patched"]
    assert ln["bf16_rewrite_vs_ref"] <= ln["bf16_ulp_at_max"], ln
    assert ln["bf16_torch_vs_ref"] <= ln["bf16_ulp_at_max"], ln
    assert ln["fp32_rewrite_vs_torch"] < 1e-5, ln
    at = e["attention"]
    assert at["math_in_derivative_mode"], at
    assert at["flags_derivative_mode"] == {"flash": False, "mem_efficient": False, "math": True,
                                           "cudnn": False}
    assert any("attention_math" in o for o in at["ops_derivative_mode"]), at
    assert any("attention_math" in o for o in at["ops_jvp"]), at
    assert not any("attention_math" in o for o in at["ops_plain"]), at  # fused on the CPU


def test_a_failing_section_or_part_is_reported_and_the_others_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_suite

    def broken(self, budget):
        raise RuntimeError("planted failure of section d")

    def broken_profiler(self):
        raise RuntimeError("planted profiler failure")

    monkeypatch.setattr(gpu_suite.Suite, "jacobian", broken)
    monkeypatch.setattr(gpu_suite.Suite, "_attention", broken_profiler)
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--smoke", "--sections", "d", "e",
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        gpu_suite.main()
    assert exit_.value.code == 1  # a section failed: the run says so
    md, js = outputs(tmp_path)
    rep = read_json(js)
    d, e = rep["sections"]["d"], rep["sections"]["e"]
    assert d["status"] == "error" and "planted failure of section d" in d["error"]
    assert e["status"] == "error" and "planted profiler failure" in e["error"]
    # the parts of e that ran are kept and right
    assert set(e["data"]) == {"jvp_vs_finite_differences", "difference_rate",
                              "layer_norm_rewrite"}
    assert e["data"]["jvp_vs_finite_differences"]["outputs"]["eps"]["best"] < 2e-3
    text = md.read_text()
    assert "planted failure of section d" in text and "planted profiler failure" in text
    assert "JVP vs central finite differences" in text


def test_a_run_past_its_budget_is_stopped_and_extrapolated(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_suite

    # fast mode gets no time: it stops after its first iteration; faithful runs all three
    monkeypatch.setattr(gpu_suite, "SMOKE", replace(gpu_suite.SMOKE, budget_fast=1e-6))
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--smoke", "--sections", "a",
                                      "--out", str(tmp_path)])
    gpu_suite.main()
    md, js = outputs(tmp_path)
    a = read_json(js)["sections"]["a"]
    assert a["status"] == "ok", a.get("error")
    fast, faithful = a["data"]["fast"], a["data"]["faithful"]
    assert fast["stopped_at_budget"] and fast["iterations_run"] == 1
    # one iteration: setup + iteration 0 stands in for each of the n
    n = a["data"]["iterations_wanted"]
    assert fast["seconds_total"] == pytest.approx(n * fast["seconds_to_first_iteration"])
    assert "final_loss" not in fast
    assert not faithful["stopped_at_budget"] and faithful["iterations_run"] == n
    assert "extrapolated from 1 iterations" in md.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_without_a_gpu_the_full_suite_refuses(tmp_path):
    proc = run(SUITE, "--out", tmp_path / "results", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "no CUDA device" in proc.stderr and "--smoke" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_smoke_runs_every_section_and_keeps_its_report(tmp_path):
    """~20 s on 2 cores: the one default test that runs every section's code."""
    out = tmp_path / "results"
    run(SUITE, "--smoke", "--threads", 1, "--out", out, cwd=tmp_path, timeout=240)
    md, js = outputs(out)
    rep = read_json(js)
    assert list(rep["sections"]) == ["a", "b", "c", "d", "e"]
    for key, sec in rep["sections"].items():
        assert sec["status"] == "ok", (key, sec.get("error"))
        assert sec["seconds"] > 0
        assert_finite(sec["data"], f"section {key}")
    a = rep["sections"]["a"]["data"]
    for mode, pairs in (("fast", 4), ("faithful", 1)):
        row = a[mode]
        assert row["pairs_per_iteration"] == pairs and row["iterations_run"] == 3
        assert not row["stopped_at_budget"] and row["seconds_per_iteration"] > 0
    b = {(r["definition"], r["estimator"]): r for r in rep["sections"]["b"]["data"]["rows"]}
    assert b[("h", "probe")]["loop_extrapolated"]
    for d in ("exact", "eps", "h-proj"):  # same basis: the Gram form is the loop's map
        assert b[(d, "gram")]["errors"]["max"] < 1e-4, b[(d, "gram")]
    c = rep["sections"]["c"]["data"]
    assert c["img2img"]["unet_calls"] >= 1 and c["pixels"]["unet_calls"] >= 1
    d = rep["sections"]["d"]["data"]
    for dtype in ("float32", "bfloat16"):
        assert d[dtype]["ops"]["forward eps (fast kernels)"]["x_forward"] == 1.0
    check_correctness(rep["sections"]["e"]["data"])
    text = md.read_text()
    for key in "abcde":
        assert f"\n## {key}. " in text
    assert text.count("status: **ok**") == 5 and "nan" not in text.lower()
    assert rep["meta"]["smoke"] and rep["meta"]["torch"] == torch.__version__
    # a second run refuses before any work and leaves both files as they were
    before = (md.read_bytes(), js.read_bytes())
    proc = run(SUITE, "--smoke", "--out", out, cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "already exists" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr and "== a." not in proc.stdout
    assert (md.read_bytes(), js.read_bytes()) == before


@pytest.mark.slow
def test_force_replaces_the_days_report(tmp_path):
    out = tmp_path / "results"
    run(SUITE, "--smoke", "--sections", "e", "--threads", 1, "--out", out, cwd=tmp_path)
    md, js = outputs(out)
    assert list(read_json(js)["sections"]) == ["e"]
    run(SUITE, "--smoke", "--sections", "d", "--threads", 1, "--force", "--out", out,
        cwd=tmp_path)
    assert outputs(out) == (md, js)
    assert list(json.loads(js.read_text())["sections"]) == ["d"]
    assert "## d. " in md.read_text() and "## e. " not in md.read_text()


def test_bundle_script_parses_and_answers_help():
    subprocess.run(["bash", "-n", str(BUNDLE)], check=True)
    proc = subprocess.run(["bash", str(BUNDLE), "--help"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: gpu_bundle.sh") and "build" in proc.stdout
    assert "run" in proc.stdout and "carry" in proc.stdout
    bad = subprocess.run(["bash", str(BUNDLE), "frobnicate"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "frobnicate" in bad.stderr
