"""Shared parts of the dataset recipes: common options, layout errors, seeded selection, mask
fitting, and the run -> evaluate step.

A recipe's ``write_jobs(...)`` returns a :class:`Plan`: the jobs files to run one after the
other (a later file may read what an earlier one wrote, e.g. RBE's ``apply`` reads the
directions a ``directions`` job saved) into the same results folder, plus what the papers'
own metrics need per job (an instruction text for CLIP_dir, the edited region for the
region-restricted CLIP_sim / DINO_sim / CLIP-I). :func:`run_and_evaluate` runs the files with
:func:`diffgeo.batch.run_batch` (resumable: finished jobs are skipped on a rerun), evaluates
with :func:`diffgeo.evaluate.evaluate_results` and adds the paper metrics that need those
per-job extras (written to ``RESULTS/paper_metrics.json``).

Recipes are scripts, not a package: they put this folder on ``sys.path`` and
``import _common``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RESULTS = "results"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ----------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Jobs files in running order, the job lines, and per-job extras for the paper metrics.

    ``extras[job_id]`` may hold ``text`` (CLIP_dir's instruction), ``region`` (a mask file drawn
    on the job's input image) and ``region_invert`` (the region is where the file is dark).
    """

    files: list[Path]
    jobs: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)


def write_jsonl(path: Path, lines: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def job_options(model: str, fit: str | None, seed: int, dtype: str = "float32"
                ) -> dict[str, Any]:
    """Keys every job of a recipe shares (``device`` is left to the batch runner's process)."""
    opts: dict[str, Any] = {"model": model, "seed": seed}
    if fit is not None:
        opts["fit"] = fit
    if dtype != "float32":
        opts["dtype"] = dtype
    return opts


_BAD_ID = re.compile(r"[^A-Za-z0-9_.\-]+")


def job_id(*parts: Any) -> str:
    """A batch job id (a folder name) from parts: other characters become '-'."""
    text = "-".join(str(p) for p in parts)
    text = _BAD_ID.sub("-", text).strip("-.") or "job"
    if not re.match(r"[A-Za-z0-9_]", text[0]):
        text = "j" + text
    return text[:128]


# ----------------------------------------------------------------------------- errors / data
def layout_error(arg: str, path: Path | str, problem: str, layout: str) -> SystemExit:
    """One-line user error naming the argument, the path and the expected layout."""
    return SystemExit(f"error: {arg} {path}: {problem}; expected {layout}")


def require_dir(path: Path | str | None, arg: str, layout: str) -> Path:
    if path is None:
        raise SystemExit(f"error: give {arg} (a folder with {layout})")
    p = Path(path)
    if not p.is_dir():
        raise layout_error(arg, p, "not a folder", layout)
    return p


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def choose(n: int, limit: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``limit`` of range(n), in ascending order (all when limit is
    None or >= n). The same (n, limit, seed) always gives the same subset."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 0:
        raise SystemExit(f"error: --limit must be >= 0, got {limit}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=limit, replace=False))


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header."""
    with Image.open(path) as im:
        return im.height, im.width


def mask_array(path: Path) -> np.ndarray:
    """A mask file as float32 (H, W) in [0, 1] (alpha if present, else luminance)."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA"):
            a = np.asarray(im.getchannel("A"), dtype=np.float32)
        else:
            a = np.asarray(im.convert("L"), dtype=np.float32)
    return a / 255.0


def save_mask(m: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(m, 0, 1) * 255).astype(np.uint8), mode="L").save(path)
    return path


def resize_mask(m: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """Resize an (H, W) [0, 1] mask to ``size`` (H, W): nearest for binary masks, bilinear for
    soft maps."""
    if m.shape == tuple(size):
        return m
    im = Image.fromarray(np.round(m * 255).astype(np.uint8), mode="L")
    im = im.resize((size[1], size[0]), Image.BILINEAR if smooth else Image.NEAREST)
    return np.asarray(im, dtype=np.float32) / 255.0


def mask_on_image(mask: Path, image: Path, folder: Path, name: str) -> Path:
    """The mask file itself when it has the image's size, else a resized (nearest) copy
    written to ``folder/name`` (diffgeo needs masks drawn on their image)."""
    size = image_size(image)
    if image_size(mask) == size:
        return mask
    return save_mask(resize_mask(mask_array(mask), size), folder / name)


# ----------------------------------------------------------------------------- CLI
def add_common_args(ap: argparse.ArgumentParser, *, out: str, limit: int | None,
                    steps: int) -> argparse.ArgumentParser:
    ap.add_argument("--out", type=Path, default=Path(out),
                    help=f"recipe folder: inputs/, JOBS*.jsonl, {RESULTS}/ (default {out})")
    ap.add_argument("--model", default="default",
                    help="diffgeo model: 'default', a hub id or a local folder")
    ap.add_argument("--limit", type=int, default=limit,
                    help=f"evaluate a seeded random subset of this many items (default {limit})")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the subset / pairing and of every job")
    ap.add_argument("--steps", type=int, default=steps, help=f"DDIM steps (default {steps})")
    ap.add_argument("--fit", default="crop", choices=("crop", "pad", "resize"),
                    help="how images are fitted to the model's size (default crop)")
    ap.add_argument("--device", default=None,
                    help="device for the jobs (default: the batch runner's process device)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clip", default=None,
                    help="CLIP model id or folder for clip_sim / clip_dir / clip_i (off if none)")
    ap.add_argument("--dino", default=None,
                    help="DINO model id or folder for dino_sim (off if none)")
    ap.add_argument("--jobs-only", action="store_true",
                    help="write the jobs files and stop (run them with `diffgeo batch`)")
    return ap


def parser(doc: str | None, **defaults: Any) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0],
                                 epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_common_args(ap, **defaults)


def main_flow(plan: Plan, args: argparse.Namespace, paper: str) -> list[dict[str, Any]] | None:
    """Print what was written; unless --jobs-only, run and evaluate; print the paper's numbers."""
    n = len(plan.jobs)
    print(f"wrote {n} job(s) in {', '.join(str(f) for f in plan.files)}")
    if args.jobs_only:
        print("run them in order with: " + " && ".join(
            f"diffgeo batch {f} --out {args.out / RESULTS}" for f in plan.files))
        return None
    table = run_and_evaluate(plan, args.out, clip=args.clip, dino=args.dino, device=args.device)
    if table is not None:
        print(f"paper: {paper}")
    return table


# ----------------------------------------------------------------------------- run + evaluate
def _barrier() -> None:
    """Wait for every process between phases when started under ``accelerate launch``."""
    from diffgeo.batch import current_shard

    if current_shard().num_processes > 1:
        try:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
        except Exception:  # torchrun without accelerate's state: nothing to wait on
            pass


def run_and_evaluate(plan: Plan, out: Path, *, clip: str | None = None,
                     dino: str | None = None, device: str | None = None,
                     metrics: Sequence[str] = ("psnr", "ssim", "mse"),
                     ) -> list[dict[str, Any]] | None:
    """Run the plan's jobs files in order into ``out/results``, then (on the main process)
    evaluate: evaluate_results' table plus the paper metrics; prints and returns the rows."""
    from diffgeo.batch import current_shard, run_batch
    from diffgeo.errors import InputError
    from diffgeo.evaluate import evaluate_results, format_table

    results = Path(out) / RESULTS
    try:
        for k, f in enumerate(plan.files):
            if k:
                _barrier()
            summary = run_batch(f, results, device=device)
            print(f"{f.name}: {summary.line()}")
            for rec in summary.records:
                if rec["status"] == "failed":
                    print(f"  {rec['id']}: {rec['error']}")
        _barrier()
        if current_shard().process_index != 0:
            return None
        table = evaluate_results(results, metrics, clip=clip, dino=dino,
                                 device=device or "cpu", force=True)
        table += paper_metrics(results, plan.extras, clip=clip, dino=dino,
                               device=device or "cpu")
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(table))
    return table


def _fit_of(settings: dict[str, Any]):
    from diffgeo.io import Fit

    d = dict(settings["fit"])
    d["in_size"], d["out_size"] = tuple(d["in_size"]), tuple(d["out_size"])
    return Fit(**d)


def paper_metrics(results: Path, extras: dict[str, dict[str, Any]], *, clip: str | None,
                  dino: str | None, device: str = "cpu") -> list[dict[str, Any]]:
    """The metrics evaluate_results cannot compute alone, over jobs with an input.png and a
    result.png (remove, blend, exemplar, ...): CLIP_dir with the job's instruction (Eq. 12),
    CLIP_sim / DINO_sim over the job's region (Eq. 13-14, region fitted like the image, I ⊙ M),
    and for exemplar jobs CLIP-I of the edited region against exemplar-1.png. Rows are named
    ``"<task> (paper)"``; the per-job values go to ``results/paper_metrics.json``."""
    if not extras or (clip is None and dino is None):
        return []
    from diffgeo import metrics as M
    from diffgeo.batch import completed_jobs, job_verb
    from diffgeo.errors import InputError
    from diffgeo.evaluate import Row
    from diffgeo.io import load_image, load_mask

    clip_model = M.ClipModel.load(clip, device=device) if clip else None
    dino_model = None
    if dino:
        from diffgeo.perceptual import DinoFeatures

        dino_model = DinoFeatures.load(dino, device)
    rows: dict[tuple[str, str], Row] = {}
    skipped: list[dict[str, str]] = []

    def add(task: str, metric: str, value: float, jid: str) -> None:
        row = rows.setdefault((task, metric), Row(f"{task} (paper)", metric))
        row.values.append(float(value))
        row.jobs.append(jid)

    for jid, spec in completed_jobs(results):
        ex = extras.get(jid)
        d = results / jid
        if not ex or not (d / "input.png").is_file() or not (d / "result.png").is_file():
            continue
        task = job_verb(spec)
        try:
            before, after = load_image(d / "input.png")[0], load_image(d / "result.png")[0]
            region = None
            if ex.get("region"):
                settings = json.loads((d / "settings.json").read_text(encoding="utf-8"))
                fit = _fit_of(settings)
                region = load_mask(ex["region"], tuple(before.shape[-2:]), fit,
                                   input_size=fit.in_size, invert=bool(ex.get("region_invert")),
                                   binary=True)[0, 0]
        except (OSError, ValueError, KeyError, TypeError, InputError) as e:
            skipped.append({"id": jid, "reason": f"{type(e).__name__}: {e}"})
            continue
        if clip_model is not None:
            if ex.get("text"):
                v = float(M.clip_dir(clip_model, before, after, ex["text"])[0])
                if math.isfinite(v):
                    add(task, "clip_dir", v, jid)
            if region is not None and task != "exemplar":
                add(task, "clip_sim_region",
                    float(M.clip_sim(clip_model, before, after, mask=region)[0]), jid)
            if task == "exemplar" and (d / "exemplar-1.png").is_file():
                exemplar = load_image(d / "exemplar-1.png")[0]
                add(task, "clip_i_region",
                    float(M.clip_i(clip_model, after, exemplar, mask=region)[0]), jid)
        if dino_model is not None and region is not None and task != "exemplar":
            add(task, "dino_sim_region",
                float(M.dino_sim(dino_model, before, after, mask=region)[0]), jid)
    table = [r.stats() for r in rows.values()]
    (results / "paper_metrics.json").write_text(json.dumps({
        "clip": clip, "dino": dino, "table": table, "skipped": skipped,
        "values": {f"{r.task}/{r.metric}": dict(zip(r.jobs, r.values, strict=True))
                   for r in rows.values()}}, indent=2), encoding="utf-8")
    return table
