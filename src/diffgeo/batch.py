"""Batch runner: many diffgeo jobs from a JSON-lines file, resumable and shardable.

    diffgeo batch JOBS.jsonl --out DIR
    accelerate launch --num_processes N -m diffgeo.batch JOBS.jsonl --out DIR

Each non-blank line of JOBS (lines starting with ``#`` are comments) is a JSON object::

    {"task": "invert", "id": "cat", "image": "cat.png", "model": "default", "t": 500}

``task`` is one of the editing verbs (invert, curves, saliency-map, directions, apply, exemplar);
``id`` names the job's folder (default ``job-NNNN``, NNNN the 1-based line number); every other
key is a keyword argument of the matching :mod:`diffgeo.runs` function (the Python names, e.g.
``num_steps``, ``pixels: [[r, c]]``); ``out``, ``force`` and ``progress`` are set by the runner.
Relative paths are taken relative to the current folder, as on the command line.

Per job the runner writes DIR/<id>/ (the verb's result folder) and, last and atomically,
DIR/<id>/.complete holding the SHA-256 of the job's spec. A job is done only when that marker
exists and its hash matches the current line: a killed run leaves no marker (or a stale one is
removed before rerunning), so the next run redoes exactly the unfinished or changed jobs, writing
over their partial files. Every job gets a record DIR/records/<id>.json (status done, failed or
skipped, seconds, error, process index): one file per job, so processes never write the same file.
A failing job, or a bad line (reported as ``line N: ...``), is recorded and the rest go on.

Under ``accelerate launch`` (``accelerate.PartialState``) job i (0-based over the non-blank lines
in file order, valid or not) runs on process i % num_processes; no communication is needed. A job
without ``device`` runs on the process's device (``PartialState().device``; cpu otherwise).
Several CPU processes: with accelerate 1.15, ``accelerate launch --cpu --num_processes N`` starts
one process unless an MPI hostfile is given; ``accelerate launch --multi_gpu --num_processes N``
on a machine without GPUs starts N processes through torchrun, and the runner takes their place
from RANK / WORLD_SIZE (PartialState reports a single process there).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffgeo.errors import InputError

TASKS = ("invert", "curves", "saliency-map", "directions", "apply", "exemplar", "transfer",
         "remove", "adjust-saliency", "blend", "inpaint")
RESERVED = ("out", "force", "progress")
MARKER = ".complete"
RECORDS = "records"
_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def task_function(task: str) -> Callable[..., dict[str, Any]]:
    from functools import partial

    from diffgeo import runs

    curve = {"transfer": "transfer", "remove": "remove", "adjust-saliency": "saliency",
             "blend": "blend"}
    if task in curve:
        return partial(runs.curve_edit, curve[task])
    return {"invert": runs.invert_image, "curves": runs.curves_for_image,
            "saliency-map": runs.saliency_for_image, "directions": runs.directions_for_image,
            "apply": runs.apply_for_image, "exemplar": runs.exemplar_edit,
            "inpaint": runs.inpaint_image}[task]


def spec_hash(spec: dict[str, Any]) -> str:
    """SHA-256 of a job spec (canonical JSON: sorted keys, no spaces)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Job:
    """One non-blank line of a jobs file: ``index`` 0-based over jobs, ``line`` 1-based."""

    index: int
    line: int
    id: str
    spec: dict[str, Any] | None = None
    error: str | None = None

    @property
    def task(self) -> str | None:
        return self.spec.get("task") if self.spec else None

    @property
    def kwargs(self) -> dict[str, Any]:
        assert self.spec is not None
        return {k: v for k, v in self.spec.items() if k not in ("task", "id")}


def _validate(obj: Any, line: int) -> str | None:
    """The problem with a parsed line, or None."""
    if not isinstance(obj, dict):
        return f"line {line}: a job must be a JSON object, got {type(obj).__name__}"
    task = obj.get("task")
    if task is None:
        return f"line {line}: missing \"task\" (one of {', '.join(TASKS)})"
    if task not in TASKS:
        return f"line {line}: unknown task {task!r} (one of {', '.join(TASKS)})"
    if "id" in obj and not (isinstance(obj["id"], str) and _ID_RE.match(obj["id"])
                            and obj["id"] != RECORDS):
        return (f"line {line}: \"id\" must be a folder name of letters, digits, '_', '-', '.' "
                f"(not {RECORDS!r}), got {obj['id']!r}")
    reserved = sorted(k for k in obj if k in RESERVED)
    if reserved:
        return (f"line {line}: {', '.join(reserved)} may not be given in a job (the batch "
                "runner sets them)")
    params = inspect.signature(task_function(task)).parameters
    args = {k for k in obj if k not in ("task", "id")}
    unknown = sorted(args - set(params))
    if unknown:
        allowed = sorted(set(params) - set(RESERVED))
        return (f"line {line}: unknown argument(s) {', '.join(unknown)} for task {task!r} "
                f"(allowed: {', '.join(allowed)})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind is not inspect.Parameter.VAR_KEYWORD and n not in obj]
    if missing:
        return f"line {line}: task {task!r} needs {', '.join(missing)}"
    return None


def read_jobs(path: str | Path) -> list[Job]:
    """Parse and validate a jobs file; bad lines come back as jobs with ``error`` set."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"jobs file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read jobs file {p}: {e}") from None
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        job = Job(index=len(jobs), line=n, id=f"job-{n:04d}")
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            job.error = f"line {n}: invalid JSON: {e.msg} (column {e.colno})"
        else:
            job.error = _validate(obj, n)
            if job.error is None:
                job.spec = obj
                job.id = obj.get("id", job.id)
                if job.id in seen:
                    job.error = (f"line {n}: duplicate id {job.id!r} (first used on line "
                                 f"{seen[job.id]})")
                    job.id = f"job-{n:04d}"
                    job.spec = None
                else:
                    seen[job.id] = n
        jobs.append(job)
    return jobs


# ----------------------------------------------------------------------------- files
def _atomic_write(path: Path, text: str) -> None:
    from diffgeo.io import atomic_write

    atomic_write(path, lambda f: f.write(text), text=True)


def read_marker(job_dir: Path) -> dict[str, Any] | None:
    """The completion marker's content if it is present and self-consistent, else None."""
    try:
        m = json.loads((job_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("spec"), dict):
        return None
    return m if m.get("hash") == spec_hash(m["spec"]) else None


def is_complete(job_dir: Path, spec: dict[str, Any]) -> bool:
    """Done = a marker whose hash is the hash of ``spec`` (the current job line)."""
    m = read_marker(job_dir)
    return m is not None and m["hash"] == spec_hash(spec)


def completed_jobs(out: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(id, spec) of every job folder under ``out`` with a valid completion marker, by id."""
    root = Path(out)
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.is_dir() and d.name != RECORDS:
            m = read_marker(d)
            if m is not None:
                found.append((d.name, m["spec"]))
    return found


# ----------------------------------------------------------------------------- running
@dataclass
class Shard:
    process_index: int = 0
    num_processes: int = 1
    device: str = "cpu"


def current_shard() -> Shard:
    """This process's place: accelerate's PartialState when importable, else one process."""
    try:
        from accelerate import PartialState
    except ImportError:
        world = _env_int("WORLD_SIZE") or 1
        return Shard(_env_int("RANK") or 0, world) if world > 1 else Shard()
    state = PartialState()
    shard = Shard(int(state.process_index), int(state.num_processes), str(state.device))
    world = _env_int("WORLD_SIZE")
    if shard.num_processes == 1 and world is not None and world > 1:
        # Observed with accelerate 1.15: `accelerate launch --multi_gpu` on a machine without
        # GPUs starts the processes (torchrun) but PartialState reports one process in each.
        shard = Shard(_env_int("RANK") or 0, world, shard.device)
    return shard


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


@dataclass
class Summary:
    records: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.records)

    def line(self) -> str:
        return (f"{len(self.records)} job(s): {self.count('done')} done, "
                f"{self.count('skipped')} skipped (already complete), "
                f"{self.count('failed')} failed")


def run_job(job: Job, out: Path, shard: Shard, models: dict | None = None) -> dict[str, Any]:
    """Run (or skip) one job and write its record; returns the record."""
    start = time.time()
    record: dict[str, Any] = {"id": job.id, "line": job.line, "index": job.index,
                              "task": job.task, "process_index": shard.process_index,
                              "num_processes": shard.num_processes, "error": None,
                              "out": str(out / job.id)}
    if job.error is not None:
        record["status"] = "failed"
        record["error"] = job.error
    else:
        assert job.spec is not None
        job_dir = out / job.id
        if is_complete(job_dir, job.spec):
            record["status"] = "skipped"
        else:
            (job_dir / MARKER).unlink(missing_ok=True)  # a stale marker must not survive a crash
            partial = job_dir.exists()
            kwargs = job.kwargs
            kwargs.setdefault("device", shard.device)
            if models is not None and isinstance(kwargs.get("model", "default"), str):
                key = (kwargs.get("model", "default"), kwargs["device"],
                       kwargs.get("dtype", "float32"))
                if key not in models:
                    from diffgeo.runs import as_backbone

                    try:
                        models[key] = as_backbone(*key)
                    except Exception:
                        models[key] = None  # let the job itself report the error
                if models[key] is not None:
                    kwargs["model"] = models[key]
            try:
                task_function(job.task)(out=job_dir, force=partial, **kwargs)
            except Exception as e:
                record["status"] = "failed"
                record["error"] = f"line {job.line}: {type(e).__name__}: {e}"
                record["traceback"] = traceback.format_exc()
            else:
                marker = {"hash": spec_hash(job.spec), "spec": job.spec,
                          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                _atomic_write(job_dir / MARKER, json.dumps(marker, sort_keys=True) + "\n")
                record["status"] = "done"
    record["seconds"] = round(time.time() - start, 4)
    _atomic_write(out / RECORDS / f"{job.id}.json",
                  json.dumps(record, sort_keys=True, indent=2) + "\n")
    return record


def run_batch(jobs_file: str | Path, out: str | Path, *, shard: Shard | None = None,
              device: str | None = None,
              on_record: Callable[[dict[str, Any]], None] | None = None) -> Summary:
    """Run this process's share of the jobs in ``jobs_file`` into ``out`` (see module doc)."""
    jobs = read_jobs(jobs_file)
    shard = shard or current_shard()
    if device is not None:
        shard = Shard(shard.process_index, shard.num_processes, device)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    models: dict = {}
    for job in jobs:
        if job.index % shard.num_processes != shard.process_index:
            continue
        rec = run_job(job, root, shard, models)
        summary.records.append(rec)
        if on_record is not None:
            on_record(rec)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffgeo.batch JOBS --out DIR [--device D]`` (for ``accelerate launch``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m diffgeo.batch", description=__doc__.split(
        "\n")[0])
    ap.add_argument("jobs", help="JSON-lines jobs file")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--device", default=None, help="device for jobs that name none")
    a = ap.parse_args(argv)
    try:
        shard = current_shard()
        summary = run_batch(a.jobs, a.out, shard=shard, device=a.device,
                            on_record=_print_record)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{shard.process_index}/{shard.num_processes}] {summary.line()}")
    # Under a launcher one process exiting non-zero gets the others killed: failed jobs are in
    # the records, so only a lone process reports them through its exit status.
    return 1 if summary.count("failed") and shard.num_processes == 1 else 0


def _print_record(rec: dict[str, Any]) -> None:
    msg = f"[{rec['process_index']}] {rec['id']}: {rec['status']} ({rec['seconds']:.1f} s)"
    if rec["error"]:
        msg += f" - {rec['error']}"
    print(msg, flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
