"""Recipe: image blending on iHarmony4 (generation-curves paper, App. D.1 / D.5, Table 1).

    python benchmarks/recipes/iharmony4_blending.py --data /path/to/iHarmony4 \
        --model stabilityai/stable-diffusion-2-1-base --subsets HCOCO,HFlickr --limit 100 \
        --clip openai/clip-vit-base-patch32 --out runs/iharmony4

Data. iHarmony4 (Cong et al., 2020, "DoveNet"; distributed by the authors' BCMI GitHub page)
as it unpacks: one folder per subset (HCOCO, HAdobe5k, HFlickr, Hday2night) with::

    <subset>/composite_images/<name>_<k>_<j>.jpg   composite j of foreground k of <name>
    <subset>/masks/<name>_<k>.png                  foreground mask k (white = pasted object)
    <subset>/real_images/<name>.jpg                the real image
    <subset>/<subset>_test.txt                     the test composites, one file name a line

(``<subset>_test.txt`` is also accepted beside the subset folders; lines may carry the
``composite_images/`` prefix.) Listed composites whose image or mask is missing are skipped
and counted.

What it runs. A seeded random subset (``--limit``) of the test composites of the chosen
``--subsets`` (default: every subset found) becomes ``blend`` jobs in OUT/JOBS.jsonl: curve
matching with the saliency-decrease loss on the seam band of the foreground mask, t=700,
``--iterations`` (paper: 100), run with ``diffgeo.batch.run_batch`` into OUT/results (rerun to
resume). The table: PSNR/SSIM/MSE of composite vs result and MSE inside/outside the band from
``diffgeo evaluate``; with ``--clip`` CLIP_dir (Eq. 12) of "make the boundary transition
smoother" and CLIP_sim. The paper (Table 1, SD 2.1-base): CLIP_dir 0.3273 (GP-GAN 0.3221).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SUBSETS = ("HCOCO", "HAdobe5k", "HFlickr", "Hday2night")
LAYOUT = ("<subset>/composite_images/<name>_<k>_<j>.jpg, <subset>/masks/<name>_<k>.png and "
          "<subset>/<subset>_test.txt for subsets " + ", ".join(SUBSETS))
TEXT = "make the boundary transition smoother"
PAPER = "CLIP_dir 0.3273 (GP-GAN 0.3221) (Table 1, SD 2.1-base)"


def _test_list(data: Path, subset: str) -> Path | None:
    for p in (data / subset / f"{subset}_test.txt", data / f"{subset}_test.txt"):
        if p.is_file():
            return p
    return None


def mask_name(composite: str) -> str:
    """``<name>_<k>_<j>.jpg`` -> ``<name>_<k>.png`` (the name may itself hold '_')."""
    stem = Path(composite).stem
    parts = stem.rsplit("_", 1)
    if len(parts) != 2 or "_" not in parts[0]:
        raise ValueError(f"composite name {composite!r} is not <name>_<k>_<j>.jpg")
    return parts[0] + ".png"


def list_composites(data: Path, subsets: list[str] | None = None
                    ) -> tuple[list[dict[str, Any]], int]:
    """(test composites with their masks in subset / file order, number skipped)."""
    data = C.require_dir(data, "--data", LAYOUT)
    chosen = list(subsets) if subsets else [s for s in SUBSETS if (data / s).is_dir()]
    if not chosen:
        raise C.layout_error("--data", data, "none of the subset folders is there", LAYOUT)
    items, skipped = [], 0
    for s in chosen:
        if not (data / s / "composite_images").is_dir():
            raise C.layout_error("--data", data / s, "no composite_images/ folder", LAYOUT)
        lst = _test_list(data, s)
        if lst is None:
            raise C.layout_error("--data", data / s, f"no {s}_test.txt", LAYOUT)
        for n, line in enumerate(lst.read_text(encoding="utf-8").splitlines(), start=1):
            name = line.strip()
            if not name:
                continue
            name = Path(name).name
            try:
                mname = mask_name(name)
            except ValueError as e:
                raise SystemExit(f"error: --data {lst} line {n}: {e}") from None
            comp = data / s / "composite_images" / name
            mask = data / s / "masks" / mname
            if not (comp.is_file() and mask.is_file()):
                skipped += 1
                continue
            items.append({"subset": s, "name": Path(name).stem, "composite": comp,
                          "mask": mask})
    if not items:
        raise C.layout_error("--data", data, f"no listed test composite with its mask in "
                             f"{', '.join(chosen)} ({skipped} listed without files)", LAYOUT)
    return items, skipped


def write_jobs(data: Path, out: Path, *, model: str = "default", limit: int | None = 100,
               seed: int = 0, steps: int = 50, fit: str | None = "crop",
               iterations: int | None = 100, subsets: list[str] | None = None,
               dtype: str = "float32") -> C.Plan:
    """OUT/JOBS.jsonl with one ``blend`` job per selected test composite."""
    out = Path(out)
    items, skipped = list_composites(Path(data), subsets)
    if skipped:
        print(f"note: {skipped} listed composite(s) without image or mask were skipped")
    opts = C.job_options(model, fit, seed, dtype)
    plan = C.Plan(files=[out / "JOBS.jsonl"])
    for i in C.choose(len(items), limit, seed):
        it = items[i]
        jid = C.job_id("blend", it["subset"], it["name"])
        mask = C.mask_on_image(it["mask"], it["composite"], out / "inputs" / "masks",
                               f"{jid}.png")
        job: dict[str, Any] = {"verb": "blend", "id": jid, "image": str(it["composite"]),
                               "mask": str(mask), **opts, "t": 700, "steps": steps}
        if iterations is not None:
            job["iterations"] = iterations
        plan.jobs.append(job)
        plan.extras[jid] = {"text": TEXT}
    C.write_jsonl(plan.files[0], plan.jobs)
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = C.parser(__doc__, out="runs/iharmony4", limit=100, steps=50)
    ap.add_argument("--data", type=Path, required=True, help=LAYOUT)
    ap.add_argument("--subsets", default=None,
                    help=f"comma-separated subsets (default: all found of {', '.join(SUBSETS)})")
    ap.add_argument("--iterations", type=int, default=100,
                    help="curve-matching iterations (paper: 100)")
    args = ap.parse_args(argv)
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()] if args.subsets else None
    plan = write_jobs(args.data, args.out, model=args.model, limit=args.limit, seed=args.seed,
                      steps=args.steps, fit=args.fit, iterations=args.iterations,
                      subsets=subsets, dtype=args.dtype)
    C.main_flow(plan, args, PAPER)


if __name__ == "__main__":
    main()
