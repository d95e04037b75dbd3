"""Batch runner (resume, bad lines, accelerate sharding) and ``evaluate`` on hand-made results."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffgeo.batch import MARKER, read_jobs, run_batch
from diffgeo.evaluate import evaluate_results, format_table


def _job(tiny: Path, image: Path, job_id: str, t: int = 300) -> str:
    return json.dumps({"verb": "invert", "id": job_id, "image": str(image), "model": str(tiny),
                       "t": t, "steps": 10, "fit": "crop"})


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


def test_resume_reruns_only_unfinished_changed_and_new_jobs(tmp_path, tiny, image):
    jobs = tmp_path / "jobs.jsonl"
    ids = ["a", "b", "c", "d"]
    jobs.write_text("\n".join(_job(tiny, image, i) for i in ids) + "\n")
    out = tmp_path / "out"
    first = run_batch(jobs, out, device="cpu")
    assert first.count("done") == 4 and first.count("failed") == 0
    for i in ids:
        assert (out / i / MARKER).is_file() and (out / i / "reconstruction.png").is_file()
    mtimes = {i: (out / i / "reconstruction.png").stat().st_mtime_ns for i in ids}

    # "b" was killed before its marker; "c"'s marker belongs to another spec; "e" is new
    (out / "b" / MARKER).unlink()
    marker = json.loads((out / "c" / MARKER).read_text())
    marker["hash"] = "0" * 64
    (out / "c" / MARKER).write_text(json.dumps(marker))
    jobs.write_text(jobs.read_text() + _job(tiny, image, "e") + "\n")
    second = run_batch(jobs, out, device="cpu")
    status = {r["id"]: r["status"] for r in second.records}
    assert status == {"a": "skipped", "b": "done", "c": "done", "d": "skipped", "e": "done"}
    recs = _records(out)
    assert {k: v["status"] for k, v in recs.items()} == status
    for i in ("a", "d"):
        assert (out / i / "reconstruction.png").stat().st_mtime_ns == mtimes[i]
    for i in ("b", "c"):
        assert (out / i / "reconstruction.png").stat().st_mtime_ns > mtimes[i]
        assert (out / i / MARKER).is_file()

    # a changed line (another t) makes its job stale: only it reruns
    lines = jobs.read_text().splitlines()
    lines[0] = _job(tiny, image, "a", t=500)
    jobs.write_text("\n".join(lines) + "\n")
    third = run_batch(jobs, out, device="cpu")
    assert [r["id"] for r in third.records if r["status"] == "done"] == ["a"]
    assert json.loads((out / "a" / "settings.json").read_text())["t"] == 500


def test_bad_lines_reported_with_line_numbers_others_run(tmp_path, tiny, image, cli):
    from diffgeo.cli import app

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([
        _job(tiny, image, "ok1"),
        "{not json",
        "",
        "# a comment",
        json.dumps({"verb": "blur", "image": str(image)}),
        json.dumps({"verb": "invert", "image": str(image), "bogus": 1}),
        json.dumps({"verb": "invert", "image": str(image), "out": "x"}),
        json.dumps({"verb": "apply", "image": str(image)}),
        json.dumps({"verb": "invert", "image": str(tmp_path / "missing.png"),
                    "model": str(tiny)}),
        _job(tiny, image, "ok2"),
    ]) + "\n")
    parsed = read_jobs(jobs)
    assert [j.line for j in parsed] == [1, 2, 5, 6, 7, 8, 9, 10]
    out = tmp_path / "out"
    res = cli.invoke(app, ["batch", str(jobs), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 1  # a lone process reports failed jobs through its exit status
    recs = _records(out)
    assert recs["ok1"]["status"] == recs["ok2"]["status"] == "done"
    errors = {r["line"]: r["error"] for r in recs.values() if r["status"] == "failed"}
    assert set(errors) == {2, 5, 6, 7, 8, 9}
    assert errors[2].startswith("line 2: invalid JSON")
    assert errors[5].startswith("line 5: unknown verb 'blur'")
    assert errors[6].startswith("line 6: verb 'invert': unknown option(s) bogus")
    assert errors[7].startswith("line 7: out may not be given")
    assert errors[8].startswith("line 8: verb 'apply': needs directions")
    assert errors[9].startswith("line 9: ") and "missing.png" in errors[9]
    assert recs["job-0002"]["line"] == 2
    printed = res.output
    assert "line 5: unknown verb 'blur'" in printed and "2 done" in printed


def _launcher_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return env


def test_accelerate_launch_two_processes_split_jobs(tmp_path, tiny, image):
    pytest.importorskip("accelerate")
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    jobs = tmp_path / "jobs.jsonl"
    ids = [f"j{i}" for i in range(5)]
    jobs.write_text("\n".join(_job(tiny, image, i) for i in ids) + "\n")
    out = tmp_path / "out"
    # Observed with accelerate 1.15: `--cpu --num_processes 2` starts ONE process unless an MPI
    # hostfile is given (multi-CPU goes through mpirun), so the two CPU processes are started
    # with torchrun through `--multi_gpu`; the runner then reads RANK / WORLD_SIZE.
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffgeo.batch",
           str(jobs), "--out", str(out), "--device", "cpu"]
    try:
        # unbuffered, as launchers often run their children: each line must still be one write
        res = subprocess.run(cmd, env=dict(_launcher_env(), PYTHONUNBUFFERED="1"),
                             capture_output=True, text=True,
                             timeout=150, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.skip("accelerate launch did not finish within 150 s here")
    if res.returncode != 0 and "Traceback" in res.stderr and not (out / "records").exists():
        pytest.skip(f"accelerate launch could not start processes here: {res.stderr[-400:]}")
    assert res.returncode == 0, res.stdout + res.stderr
    recs = _records(out)
    assert sorted(recs) == ids
    assert all(r["status"] == "done" and r["num_processes"] == 2 for r in recs.values())
    by_proc = {r["id"]: r["process_index"] for r in recs.values()}
    assert by_proc == {f"j{i}": i % 2 for i in range(5)}
    # each job ran once: its process printed it once, nobody else did
    done_lines = [ln for ln in res.stdout.splitlines() if ": done (" in ln]
    assert sorted(ln.split("] ")[1].split(":")[0] for ln in done_lines) == ids


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _fake_invert(out: Path, job_id: str, a: np.ndarray, b: np.ndarray) -> None:
    from diffgeo.batch import spec_hash
    from diffgeo.io import atomic_write

    d = out / job_id
    _write(d / "input.png", a)
    _write(d / "reconstruction.png", b)
    spec = {"task": "invert", "id": job_id, "image": "x.png"}
    atomic_write(d / MARKER, json.dumps({"hash": spec_hash(spec), "spec": spec}))


def test_evaluate_reproduces_hand_computed_numbers(tmp_path, capsys):
    out = tmp_path / "res"
    H, W = 16, 16
    base = np.full((H, W, 3), 100, np.uint8)
    # job 1: every value off by 10 (of 255); job 2: off by 30 in one channel
    b1 = base + 10
    b2 = base.copy()
    b2[..., 0] += 30
    _fake_invert(out, "one", base, b1)
    _fake_invert(out, "two", base, b2)
    # a folder without a valid marker is partial: not evaluated
    _write(out / "partial" / "input.png", base)
    _write(out / "partial" / "reconstruction.png", base + 50)

    mse1 = (2 * 10 / 255) ** 2  # images are mapped to [-1, 1]: a step of 1/255 is 2/255
    mse2 = (2 * 30 / 255) ** 2 / 3
    psnr = [10 * math.log10(4 / m) for m in (mse1, mse2)]
    table = evaluate_results(out, ["psnr", "mse"])
    got = {r["metric"]: r for r in table}
    assert got["mse"]["n"] == got["psnr"]["n"] == 2
    assert got["mse"]["mean"] == pytest.approx((mse1 + mse2) / 2, rel=1e-6)
    assert got["mse"]["std"] == pytest.approx(abs(mse1 - mse2) / 2, rel=1e-6)
    assert got["psnr"]["mean"] == pytest.approx(sum(psnr) / 2, rel=1e-6)
    assert got["psnr"]["std"] == pytest.approx(abs(psnr[0] - psnr[1]) / 2, rel=1e-6)

    csv = (out / "evaluation.csv").read_text().splitlines()
    assert csv[0] == "task,metric,mean,std,n,non_finite"
    assert csv[1].startswith("invert,psnr,")
    data = json.loads((out / "evaluation.json").read_text())
    assert data["jobs"] == 2
    assert data["values"]["invert/mse"]["one"] == pytest.approx(mse1, rel=1e-6)
    text = format_table(table)
    assert "invert" in text and "psnr" in text and "± " in text and "N=2" in text

    # identical images: PSNR inf is left out of the mean and counted; refuses to overwrite
    from diffgeo.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        evaluate_results(out, ["psnr"])
    _fake_invert(out, "same", base, base)
    table = evaluate_results(out, ["psnr", "ssim"], force=True)
    row = next(r for r in table if r["metric"] == "psnr")
    assert row["n"] == 2 and row["non_finite"] == 1
    ssim = next(r for r in table if r["metric"] == "ssim")
    assert ssim["n"] == 3


def test_cli_batch_then_evaluate(tmp_path, tiny, image, cli):
    from diffgeo.cli import app

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(_job(tiny, image, "a") + "\n" + json.dumps({"verb": "nope"}) + "\n")
    out = tmp_path / "out"
    res = cli.invoke(app, ["batch", str(jobs), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert "a: done" in res.output and "line 2: unknown verb 'nope'" in res.output
    assert "1 done" in res.output and "1 failed" in res.output
    res = cli.invoke(app, ["batch", str(jobs), "--out", str(out), "--device", "cpu"])
    assert "a: skipped" in res.output
    res = cli.invoke(app, ["batch", str(tmp_path / "none.jsonl"), "--out", str(out)])
    assert res.exit_code == 2 and "does not exist" in res.output

    res = cli.invoke(app, ["evaluate", str(out), "--metric", "psnr", "--metric", "mse"])
    assert res.exit_code == 0, res.output
    assert "invert" in res.output and "psnr" in res.output and "N=1" in res.output
    assert (out / "evaluation.csv").is_file() and (out / "evaluation.json").is_file()
    psnr = json.loads((out / "a" / "settings.json").read_text())["psnr"]
    row = next(r for r in json.loads((out / "evaluation.json").read_text())["table"]
               if r["metric"] == "psnr")
    assert row["mean"] == pytest.approx(psnr, abs=0.3)  # the run's PSNR, from 8-bit PNGs
    res = cli.invoke(app, ["evaluate", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    res = cli.invoke(app, ["evaluate", str(out), "--metric", "lpips", "--force"])
    assert res.exit_code == 2 and "unknown metric" in res.output


def test_killed_run_resumes_without_redoing_finished_jobs(tmp_path, tiny, image):
    import signal
    import time

    jobs = tmp_path / "jobs.jsonl"
    ids = [f"k{i}" for i in range(8)]
    jobs.write_text("\n".join(_job(tiny, image, i) for i in ids) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "diffgeo.batch", str(jobs), "--out", str(out),
                             "--device", "cpu"], env=_launcher_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:  # kill it once a job has finished
        if (out / "records").is_dir() and any((out / "records").glob("*.json")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = {i for i in ids if (out / i / MARKER).is_file()}
    assert finished, "the run was killed before any job finished"
    assert len(finished) < len(ids), "the run finished before it could be killed"
    mtimes = {i: (out / i / MARKER).stat().st_mtime_ns for i in finished}
    summary = run_batch(jobs, out, device="cpu")
    status = {r["id"]: r["status"] for r in summary.records}
    assert {i for i, s in status.items() if s == "skipped"} == finished
    assert {i for i, s in status.items() if s == "done"} == set(ids) - finished
    assert all((out / i / MARKER).stat().st_mtime_ns == mtimes[i] for i in finished)
    assert all((out / i / MARKER).is_file() for i in ids)


def test_evaluate_apply_and_exemplar_folders(tmp_path):
    from diffgeo.batch import spec_hash
    from diffgeo.io import atomic_write

    out = tmp_path / "res"
    base = np.full((16, 16, 3), 120, np.uint8)
    # apply: result.png = reconstruction | gap | edits; edit-J.png per strength
    d = out / "ap"
    e0, e1 = base + 20, base.copy()
    gap = np.full((16, 2, 3), 255, np.uint8)
    _write(d / "result.png", np.concatenate([base, gap, e0, gap, e1], axis=1))
    _write(d / "edit-0.png", e0)
    _write(d / "edit-1.png", e1)
    (d / "settings.json").write_text(json.dumps({"strengths": [-30, 0], "locality": [
        {"strength": -30, "mse_inside": 0.5, "mse_outside": 0.1},
        {"strength": 0, "mse_inside": 0.0, "mse_outside": 0.0}]}))
    # exemplar: input.png vs result.png
    x = out / "ex"
    _write(x / "input.png", base)
    _write(x / "result.png", base + 5)
    _write(x / "exemplar-1.png", base)
    for job_id, task in (("ap", "apply"), ("ex", "exemplar")):
        spec = {"task": task, "id": job_id}
        atomic_write(out / job_id / MARKER, json.dumps({"hash": spec_hash(spec), "spec": spec}))
    rows = {(r["task"], r["metric"]): r for r in evaluate_results(out, ["psnr", "mse"])}
    assert rows[("apply (α=-30)", "mse")]["mean"] == pytest.approx((40 / 255) ** 2, rel=1e-6)
    assert rows[("apply (α=-30)", "mse_inside")]["mean"] == 0.5
    assert rows[("apply (α=0)", "psnr")]["non_finite"] == 1
    assert rows[("exemplar", "mse")]["mean"] == pytest.approx((10 / 255) ** 2, rel=1e-6)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_folder_the_runner_did_not_start_is_never_written(tmp_path, tiny, image):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(_job(tiny, image, "mine") + "\n" + _job(tiny, image, "ok") + "\n")
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "input.png").write_bytes(b"the user's own file")
    summary = run_batch(jobs, out, device="cpu")
    recs = _records(out)
    assert recs["ok"]["status"] == "done"
    assert recs["mine"]["status"] == "failed"
    assert "was not written by diffgeo batch" in recs["mine"]["error"]
    assert summary.count("failed") == 1
    assert sorted(p.name for p in (out / "mine").iterdir()) == ["input.png"]
    assert (out / "mine" / "input.png").read_bytes() == b"the user's own file"


def test_a_batch_killed_mid_job_resumes_without_partial_results(tmp_path, tiny, image):
    import signal
    import time

    jobs = tmp_path / "jobs.jsonl"
    ids = [f"k{i}" for i in range(4)]
    # exact inversion: slow enough per job to be killed in the middle of one
    jobs.write_text("\n".join(json.dumps({**json.loads(_job(tiny, image, i)), "exact": True,
                                          "max_iter": 200, "tol": 1e-12}) for i in ids) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from diffgeo.cli import main; main()", "batch", str(jobs),
           "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_launcher_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "k0" / ".complete").exists():
            time.sleep(0.05)
        assert (out / "k0" / ".complete").exists(), "the first job never finished"
        while time.time() < deadline and not (out / "k1" / ".diffgeo-job").exists():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    # k1 was killed at its start: its folder holds the runner's marker and the verb's staging
    # folder, no result under a final name
    left = {p.name for p in (out / "k1").iterdir()}
    assert ".diffgeo-job" in left
    assert all(n == ".diffgeo-job" or n.startswith(".diffgeo-partial-") for n in left), left
    summary = run_batch(jobs, out, device="cpu")
    status = {r["id"]: r["status"] for r in summary.records}
    assert status["k0"] == "skipped" and all(status[i] == "done" for i in ids[1:])
    for i in ids:
        assert not list((out / i).glob(".diffgeo-partial-*"))  # the staging of k1 is gone
        assert (out / i / "settings.json").exists()
