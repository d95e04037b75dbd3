"""Batch runner: many diffgeo jobs from a JSON-lines file, resumable and shardable.

    diffgeo batch JOBS.jsonl --out DIR
    accelerate launch --num_processes N -m diffgeo.batch JOBS.jsonl --out DIR

Each non-blank line of JOBS (lines starting with ``#`` are comments) is a JSON object::

    {"verb": "invert", "id": "cat", "image": "cat.png", "model": "default", "t": 500}

``verb`` is any verb of :mod:`diffgeo.verbs` that writes a result folder, by its CLI name
(invert, curves, saliency-map, transfer, remove, adjust-saliency, blend, inpaint, directions,
apply, exemplar); ``id`` names the job's folder (default ``job-NNNN``, NNNN the 1-based line
number); every other key is one of the verb's options by its CLI name (``--steps`` is
``steps``, ``--pixels-per-iteration`` is ``pixels_per_iteration``; repeatable flags take a
list: ``"pixel": ["5,10"]``). ``out`` and ``force`` are set by the runner. A settings.json
written by a verb is a job line as it is: its ``options`` are the job's and the rest (what the
run measured) is ignored. Relative paths are taken relative to the current folder, as on the
command line.

Per job the runner writes DIR/<id>/.diffgeo-job (the folder is the runner's), then the verb's
result folder (staged and moved into place whole when the verb succeeds) and, last and
atomically, DIR/<id>/.complete holding the SHA-256 of the job's spec. A job is done only when
that marker exists and its hash matches the current line: a killed run leaves no marker (or a
stale one is removed before rerunning), so the next run redoes exactly the unfinished or changed
jobs, writing over their files. A folder under a job's id that the runner did not start (no
.diffgeo-job, no .complete) is never written: that job fails with a message saying so.
Every job gets a record DIR/records/<id>.json (status done, failed or
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
import json
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from diffgeo.errors import InputError
from diffgeo.verbs.options import RESERVED

MARKER = ".complete"
#: Written into a job's folder before its verb runs: the folder is the runner's to resume.
STARTED = ".diffgeo-job"
RECORDS = "records"
_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def batch_verbs() -> list[str]:
    """The verbs a job may name: those that write a result folder."""
    from diffgeo.verbs import all_verbs

    return [v.name for v in all_verbs() if v.batchable]


def job_verb(spec: dict[str, Any]) -> str | None:
    """The verb of a job spec (markers written before the rename say "task")."""
    return spec.get("verb", spec.get("task"))


def job_options(spec: dict[str, Any]) -> dict[str, Any]:
    """A job's options: a settings.json's "options", else every key but verb and id."""
    if isinstance(spec.get("options"), dict):
        return dict(spec["options"])
    return {k: v for k, v in spec.items() if k not in ("verb", "id")}


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
    def verb(self) -> str | None:
        return job_verb(self.spec) if self.spec else None


def _validate(obj: Any, line: int) -> str | None:
    """The problem with a parsed line, or None: the verb's options are built (and so checked)
    here, before anything runs."""
    from diffgeo.verbs import get

    if not isinstance(obj, dict):
        return f"line {line}: a job must be a JSON object, got {type(obj).__name__}"
    names = batch_verbs()
    if "verb" not in obj and "task" in obj:
        return (f"line {line}: \"task\" is now \"verb\" (with the CLI's verb names and "
                f"option names, e.g. \"steps\" for num_steps)")
    verb = obj.get("verb")
    if verb is None:
        return f"line {line}: missing \"verb\" (one of {', '.join(names)})"
    if verb not in names:
        return f"line {line}: unknown verb {verb!r} (one of {', '.join(names)})"
    if "id" in obj and not (isinstance(obj["id"], str) and _ID_RE.match(obj["id"])
                            and obj["id"] != RECORDS):
        return (f"line {line}: \"id\" must be a folder name of letters, digits, '_', '-', '.' "
                f"(not {RECORDS!r}), got {obj['id']!r}")
    values = job_options(obj)
    reserved = sorted(k for k in values if k in RESERVED)
    if reserved:
        return (f"line {line}: {', '.join(reserved)} may not be given in a job (the batch "
                "runner sets them)")
    try:
        get(verb).options.build(values)
    except InputError as e:
        return f"line {line}: verb {verb!r}: {e}"
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
def read_marker(job_dir: Path) -> dict[str, Any] | None:
    """The completion marker's content if it is present and self-consistent, else None."""
    try:
        m = json.loads((job_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("spec"), dict):
        return None
    return m if m.get("hash") == spec_hash(m["spec"]) else None


def is_ours(job_dir: Path) -> bool:
    """The folder was started by a batch run (so a later run may write over its files)."""
    return (job_dir / STARTED).is_file() or read_marker(job_dir) is not None


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


def _run_job(job: Job, job_dir: Path, partial: bool, shard: Shard, models: dict | None) -> None:
    """Build the job's options (device: the process's unless the job names one) and run its
    verb into ``job_dir``, on a backbone loaded once per model and loading options."""
    from diffgeo.verbs import get

    assert job.spec is not None and job.verb is not None
    verb = get(job.verb)
    values = job_options(job.spec)
    values.setdefault("device", shard.device)
    opts = replace(verb.options.build(values), out=job_dir, force=partial)
    backbone = None
    if models is not None:
        load = opts.load_kwargs()
        key = (opts.model, *load.values())
        if key not in models:
            from diffgeo.backbones import load_backbone

            try:
                models[key] = load_backbone(opts.model, **load)
            except Exception:
                models[key] = None  # let the job itself report the error
        backbone = models[key]
    verb.run(opts, backbone=backbone)


def _mark_started(job_dir: Path, spec: dict[str, Any]) -> None:
    """Write the job's start marker; a new folder appears with its marker already inside (built
    beside it and renamed), so a kill never leaves a folder of ours that does not say so."""
    from diffgeo.io import atomic_write

    text = json.dumps({"hash": spec_hash(spec)}) + "\n"
    if job_dir.exists():
        atomic_write(job_dir / STARTED, text)
        return
    building = job_dir.with_name(f".{job_dir.name}.starting-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)  # ours, from a run killed right here
    building.mkdir(parents=True)
    atomic_write(building / STARTED, text)
    building.rename(job_dir)


def run_job(job: Job, out: Path, shard: Shard, models: dict | None = None) -> dict[str, Any]:
    """Run (or skip) one job and write its record; returns the record."""
    from diffgeo.io import atomic_write
    from diffgeo.io.results import STAGING_PREFIX

    start = time.time()
    record: dict[str, Any] = {"id": job.id, "line": job.line, "index": job.index,
                              "verb": job.verb, "process_index": shard.process_index,
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
        elif job_dir.exists() and not is_ours(job_dir):
            record["status"] = "failed"
            record["error"] = (f"line {job.line}: {job_dir} exists and was not written by "
                               "diffgeo batch; move it away, or choose another --out or id")
        else:
            (job_dir / MARKER).unlink(missing_ok=True)  # a stale marker must not survive a crash
            partial = job_dir.exists()
            try:
                if partial:  # what a killed run of ours staged and never committed
                    for staged in job_dir.glob(f"{STAGING_PREFIX}*"):
                        shutil.rmtree(staged, ignore_errors=True)
                _mark_started(job_dir, job.spec)
                _run_job(job, job_dir, partial, shard, models)
            except Exception as e:
                record["status"] = "failed"
                record["error"] = f"line {job.line}: {type(e).__name__}: {e}"
                record["traceback"] = traceback.format_exc()
            else:
                marker = {"hash": spec_hash(job.spec), "spec": job.spec,
                          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                atomic_write(job_dir / MARKER, json.dumps(marker, sort_keys=True) + "\n")
                record["status"] = "done"
    record["seconds"] = round(time.time() - start, 4)
    atomic_write(out / RECORDS / f"{job.id}.json",
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


if __name__ == "__main__":  # pragma: no cover - what `accelerate launch -m` starts
    from diffgeo.cli import app

    sys.exit(app(["batch", *sys.argv[1:]], prog_name="python -m diffgeo.batch"))
