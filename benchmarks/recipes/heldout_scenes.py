"""Offline evaluation recipe: the bundled held-out scenes through `diffgeo batch` and
`diffgeo evaluate`, end to end on this machine (no data or model downloads).

    python benchmarks/recipes/heldout_scenes.py --out runs/heldout-eval [--scenes 16] [--steps 50]

It writes the scenes as PNGs (composite, object mask, and the object alone for exemplars), a
JOBS.jsonl with, per scene, an exact DDIM inversion (`invert`) and a PIXELS edit that pastes the
next scene's object into it through its mask (`exemplar`), runs the batch (resumable: run it
again after an interruption) and prints the evaluation table (PSNR, SSIM, MSE: mean ± std, N).
The same JOBS.jsonl format drives the papers' evaluations on real data with real models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffgeo.batch import run_batch
from diffgeo.data import bundled_scenes
from diffgeo.evaluate import evaluate_results, format_table


def write_inputs(folder: Path, n: int) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = bundled_scenes(32)[:n]
    files = []
    for i, s in enumerate(scenes):
        comp = folder / f"scene-{i:03d}.png"
        Image.fromarray(np.round(s.composite * 255).astype(np.uint8)).save(comp)
        # PIXELS map drawn on the target: 0 (take the exemplar) where the *exemplar's* object is
        keep = folder / f"keep-{i:03d}.png"
        Image.fromarray(((1 - s.mask) * 255).astype(np.uint8)).save(keep)
        files.append({"composite": str(comp), "keep": str(keep)})
    return files


def write_jobs(path: Path, files: list[dict], steps: int, model: str) -> None:
    lines = []
    n = len(files)
    for i, f in enumerate(files):
        lines.append({"verb": "invert", "id": f"invert-{i:03d}", "image": f["composite"],
                      "model": model, "t": 700, "steps": steps, "exact": True})
        j = (i + 1) % n
        lines.append({"verb": "exemplar", "id": f"exemplar-{i:03d}", "source": f["composite"],
                      "exemplar": [files[j]["composite"]], "map": [files[j]["keep"]],
                      "model": model, "strength": 0.6, "steps": steps})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/heldout-eval"))
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    files = write_inputs(args.out / "inputs", args.scenes)
    jobs = args.out / "JOBS.jsonl"
    write_jobs(jobs, files, args.steps, args.model)
    summary = run_batch(jobs, args.out / "results")
    print(summary.line())
    table = evaluate_results(args.out / "results", force=True)
    print(format_table(table))


if __name__ == "__main__":
    main()
