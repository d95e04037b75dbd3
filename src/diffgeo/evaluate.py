"""``diffgeo evaluate RESULTS_DIR``: metrics over a batch's finished jobs, as a papers' table.

Jobs counted are the folders of RESULTS_DIR with a valid completion marker (see
:mod:`diffgeo.batch`); each verb compares the pair its registry entry names (``Verb.compared``):

- invert:   input.png (the image as fitted) vs reconstruction.png.
- exemplar: input.png (the source) vs result.png; with a CLIP model also CLIP-I of result.png
  against exemplar-1.png.
- apply ("strengths"): the reconstruction (the first panel of result.png, which is edit-free)
  vs each edit-J.png, grouped per strength as "apply (α=S)". MSE inside / outside the edit
  region is read from the job's settings.json ("locality", computed by the run with the
  discovery mask or --mask), since the region is not stored as an image.
- transfer, remove, adjust-saliency, blend, inpaint: input.png vs result.png, with MSE inside /
  outside the edited region from the job's settings.json ("locality").
- curves, saliency-map, directions produce no edited image of their own: not evaluated.

Metrics (:mod:`diffgeo.metrics`): psnr (dB, images in [-1, 1]), ssim, mse (mean squared
difference on [-1, 1] images; for apply also mse_inside / mse_outside), and with ``clip`` /
``dino`` models clip_sim / dino_sim of the same pairs (plus clip_i for exemplar). Each row is
mean ± std over the jobs (population std, ddof = 0) and N; non-finite values (PSNR of identical
images is inf) are left out of the mean and counted separately. Written as evaluation.csv and
evaluation.json in RESULTS_DIR.

Always added when they can run here without downloading anything (``lpips`` / ``fid`` = False
turn them off): lpips, per pair (LPIPS AlexNet, :func:`diffgeo.metrics.lpips_distance`), and fid,
per task (:func:`diffgeo.metrics.fid`). When they cannot run, the table has no such rows and
``notes`` (printed under the table by :func:`format_table`, and "notes" in evaluation.json) says
why, in one line each.

Set metrics (:data:`SET_METRICS`): fd_dino (with a ``dino`` model: the Fréchet distance between
the DINO features of all the "before" images and all the "after" images of a task,
:func:`diffgeo.metrics.fd_dino`) and fid. Their row holds one value for the whole task: mean is
that value, N the number of pairs it was computed from, std is NaN (a set metric has no spread
over jobs; written "nan" in the CSV and JSON) and non_finite 0. A task with fewer than 2 pairs
gets no set row but a note (a covariance needs 2 samples). evaluation.json lists their jobs under
"sets". FD values depend on N (they are biased upwards for small sets): compare them at equal N.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffgeo.errors import InputError

METRICS = ("psnr", "ssim", "mse")
SET_METRICS = ("fd_dino", "fid")
"""Metrics with one value per task (over all its pairs), not one per job."""


def evaluated() -> dict[str, tuple[str, str] | str]:
    """Verb name -> what its folder compares, for every evaluated verb of the registry."""
    from diffgeo.verbs import all_verbs

    return {v.name: v.compared for v in all_verbs() if v.compared is not None}


@dataclass
class Row:
    task: str
    metric: str
    values: list[float] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        v = np.asarray(self.values, dtype=np.float64)
        fin = v[np.isfinite(v)]
        mean = float(fin.mean()) if fin.size else math.nan
        std = float(fin.std(ddof=0)) if fin.size else math.nan
        return {"task": self.task, "metric": self.metric, "mean": mean, "std": std,
                "n": int(fin.size), "non_finite": int(v.size - fin.size)}


@dataclass
class SetRow:
    """A set metric of one task: features of every "before" / "after" image, one value."""

    task: str
    metric: str
    before: list[torch.Tensor] = field(default_factory=list)
    after: list[torch.Tensor] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    value: float = math.nan

    def stats(self) -> dict[str, Any]:
        finite = math.isfinite(self.value)
        return {"task": self.task, "metric": self.metric, "mean": self.value, "std": math.nan,
                "n": len(self.jobs), "non_finite": 0 if finite else 1}


class Table(list):
    """The table's rows (dicts: task, metric, mean, std, n, non_finite), plus ``notes``: lines
    that say which metrics are missing and why."""

    def __init__(self, rows: Any = (), notes: Any = ()):
        super().__init__(rows)
        self.notes: list[str] = list(notes)


def _load(path: Path) -> torch.Tensor:
    from diffgeo.io import load_image

    return load_image(path)[0].double()


def _first_panel(strip: Path, like: torch.Tensor) -> torch.Tensor:
    full = _load(strip)
    return full[..., : like.shape[-1]]


def _locality(job_dir: Path) -> Any:
    settings = json.loads((job_dir / "settings.json").read_text(encoding="utf-8"))
    return settings.get("locality"), settings


def _pairs(task: str, compared: tuple[str, str] | str,
           job_dir: Path) -> list[tuple[str, torch.Tensor, torch.Tensor, dict]]:
    """(group, before, after, extras) for one job; extras: exemplar tensor / precomputed mse."""
    if compared == "strengths":
        loc, settings = _locality(job_dir)
        edits = sorted(job_dir.glob("edit-*.png"), key=lambda p: int(p.stem.split("-")[1]))
        if not edits:
            return []
        first = _load(edits[0])
        recon = _first_panel(job_dir / "result.png", first)
        loc = loc or []
        out = []
        for j, (p, s) in enumerate(zip(edits, settings["strengths"], strict=False)):
            extras = {}
            if j < len(loc):
                extras = {"mse_inside": loc[j]["mse_inside"], "mse_outside": loc[j]["mse_outside"]}
            out.append((f"{task} (α={s:g})", recon, _load(p), extras))
        return out
    before, after = compared
    extras: dict[str, Any] = {}
    if (job_dir / "exemplar-1.png").is_file():
        extras["exemplar"] = _load(job_dir / "exemplar-1.png")
    if (job_dir / "settings.json").is_file():
        loc, _ = _locality(job_dir)
        if isinstance(loc, dict):
            extras.update({k: loc[k] for k in ("mse_inside", "mse_outside") if k in loc})
    return [(task, _load(job_dir / before), _load(job_dir / after), extras)]


def evaluate_results(results_dir: str | Path, metrics: tuple[str, ...] | list[str] = METRICS, *,
                     clip: str | None = None, dino: str | None = None, device: str = "cpu",
                     force: bool = False, write: bool = True, lpips: bool = True,
                     fid: bool = True) -> Table:
    """Evaluate every finished job under ``results_dir``; returns the table rows (dicts with
    task, metric, mean, std, n, non_finite; a :class:`Table`, whose ``notes`` say which metrics
    could not be computed and why) and writes evaluation.csv / evaluation.json.

    ``lpips`` / ``fid``: add LPIPS per pair / FID per task when they are available locally
    (nothing is downloaded); when they are not, a note says why instead."""
    from diffgeo import metrics as M
    from diffgeo.batch import completed_jobs, job_verb
    from diffgeo.io import ResultDir

    root = Path(results_dir)
    if not root.is_dir():
        raise InputError(f"results folder {root} does not exist")
    metrics = list(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise InputError(f"unknown metric(s) {', '.join(bad)} (choose among {', '.join(METRICS)}; "
                         "LPIPS and FID are added when available, fd_dino with a DINO model)")
    results = ResultDir(root, force=force) if write else None
    if results is not None:
        results.path_for("evaluation.csv")
        results.path_for("evaluation.json")
    clip_model = M.ClipModel.load(clip, device=device) if clip else None
    dino_model = None
    if dino:
        from diffgeo.perceptual import DinoFeatures

        dino_model = DinoFeatures.load(dino, device)
    notes: list[str] = []

    def usable(wanted: bool, available: Any, load: Any) -> bool:
        if not wanted:
            return False
        ok, reason = available()
        if ok:
            try:
                load(str(device))  # load once now: a broken install is a note, not a crash
            except InputError as e:
                ok, reason = False, str(e)
        if not ok:
            notes.append(reason)
        return ok

    use_lpips = usable(lpips, M.lpips_available, M._lpips_model)
    use_fid = usable(fid, M.fid_available, M._inception_model)
    rows: dict[tuple[str, str], Row] = {}
    sets: dict[tuple[str, str], SetRow] = {}
    skipped: list[dict[str, str]] = []

    def add(group: str, metric: str, value: float, job: str) -> None:
        row = rows.setdefault((group, metric), Row(group, metric))
        row.values.append(float(value))
        row.jobs.append(job)

    def add_set(group: str, metric: str, fb: torch.Tensor, fa: torch.Tensor, job: str) -> None:
        row = sets.setdefault((group, metric), SetRow(group, metric))
        row.before.append(fb.double().cpu())
        row.after.append(fa.double().cpu())
        row.jobs.append(job)

    jobs = completed_jobs(root)
    compared = evaluated()
    for job_id, spec in jobs:
        task = job_verb(spec)
        if task not in compared:
            skipped.append({"id": job_id, "reason": f"verb {task!r} has no edited image"})
            continue
        try:
            pairs = _pairs(task, compared[task], root / job_id)
        except (OSError, ValueError, KeyError, InputError) as e:
            skipped.append({"id": job_id, "reason": f"{type(e).__name__}: {e}"})
            continue
        for group, before, after, extras in pairs:
            if before.shape != after.shape:
                skipped.append({"id": job_id, "reason": f"{group}: images differ in size"})
                continue
            if "psnr" in metrics:
                add(group, "psnr", M.psnr(before, after)[0], job_id)
            if "ssim" in metrics and min(before.shape[-2:]) >= 11:
                add(group, "ssim", M.ssim(before, after)[0], job_id)
            if "mse" in metrics:
                add(group, "mse", float(((after - before) ** 2).mean()), job_id)
                for k in ("mse_inside", "mse_outside"):
                    if k in extras:
                        add(group, k, extras[k], job_id)
            if clip_model is not None:
                add(group, "clip_sim", M.clip_sim(clip_model, before.float(), after.float())[0],
                    job_id)
                if "exemplar" in extras:
                    add(group, "clip_i", M.clip_i(clip_model, after.float(),
                                                  extras["exemplar"].float())[0], job_id)
            if dino_model is not None:
                # the same features give DINO_sim of the pair (= M.dino_sim) and feed fd_dino
                fb, fa = dino_model(before.float()), dino_model(after.float())
                add(group, "dino_sim", M._cos(fb, fa)[0], job_id)
                add_set(group, "fd_dino", fb, fa, job_id)
            if use_lpips:
                try:
                    value = M.lpips_distance(before.float(), after.float(), device=device)[0]
                except (InputError, RuntimeError) as e:  # e.g. images too small for AlexNet
                    skipped.append({"id": job_id, "reason": f"{group}: lpips: {e}"})
                else:
                    add(group, "lpips", value, job_id)
            if use_fid:
                feats = M.inception_features(torch.cat([before, after]).float(), device=device)
                add_set(group, "fid", feats[:1], feats[1:], job_id)
    for (group, metric), srow in sets.items():
        if len(srow.jobs) < 2:
            notes.append(f"{metric} not computed for {group}: a set metric needs at least 2 "
                         f"pairs, this task has {len(srow.jobs)}")
            continue
        srow.value = M.frechet_distance(torch.cat(srow.before), torch.cat(srow.after))
    done_sets = [r for r in sets.values() if len(r.jobs) >= 2]
    table = Table([r.stats() for r in rows.values()] + [r.stats() for r in done_sets], notes)
    if results is not None:
        results.save_csv("evaluation.csv", ["task", "metric", "mean", "std", "n", "non_finite"],
                         [[r["task"], r["metric"], r["mean"], r["std"], r["n"], r["non_finite"]]
                          for r in table], allow_nan=True)  # nan: fewer than 2 pairs
        results.save_json("evaluation.json", {
            "results_dir": str(root), "metrics": metrics, "clip": clip, "dino": dino,
            "jobs": len(jobs), "skipped": skipped, "table": list(table), "notes": notes,
            "values": {f"{r.task}/{r.metric}": dict(zip(r.jobs, r.values, strict=True))
                       for r in rows.values()},
            "sets": {f"{r.task}/{r.metric}": {"value": r.value, "jobs": r.jobs}
                     for r in done_sets},
        })
    return table


def format_table(table: list[dict[str, Any]], notes: list[str] | None = None) -> str:
    """The rows as text: one block per task, ``metric  mean ± std  N``; set metrics (one value
    over the task's N pairs, std NaN) say so. Then one ``note:`` line per note (``notes``, or
    the table's own when it is a :class:`Table`)."""
    if notes is None:
        notes = list(getattr(table, "notes", []))
    lines: list[str] = []
    tasks: list[str] = []
    for r in table:
        if r["task"] not in tasks:
            tasks.append(r["task"])
    for task in tasks:
        lines.append(task)
        for r in (r for r in table if r["task"] == task):
            extra = f"  ({r['non_finite']} non-finite left out)" if r["non_finite"] else ""
            if r["metric"] in SET_METRICS:
                extra = "  (set metric: one value over the N pairs)"
            lines.append(f"  {r['metric']:<12} {r['mean']:>10.4g} ± {r['std']:<10.4g} "
                         f"N={r['n']}{extra}")
    if not lines:
        lines.append("no finished jobs with images to evaluate")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
