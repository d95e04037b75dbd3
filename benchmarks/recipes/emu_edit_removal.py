"""Recipe: object removal on the Emu Edit test set (generation-curves paper, App. D.1 / D.3).

    python benchmarks/recipes/emu_edit_removal.py --data /path/to/emu-removal \
        --model stabilityai/stable-diffusion-2-1-base --limit 100 \
        --clip openai/clip-vit-base-patch32 --dino facebook/dino-vits16 --out runs/emu-removal

Data. The Emu Edit test set (Sheynin et al., 2023; Hugging Face ``facebook/emu_edit_test_set``)
gives images, captions and instructions, but no object masks: the paper segments the object to
remove with an off-the-shelf tool. Bring the removal subset with your masks as a folder::

    DATA/index.jsonl   one JSON object per line:
        {"id": "123", "image": "images/123.png", "mask": "masks/123.png",
         "instruction": "Remove the car", "task": "remove", "reference": [40, 200]}
    (or DATA/index.csv with the columns id,image,mask,instruction[,task][,reference "r,c"])

``image`` and ``mask`` are paths relative to DATA (white = the object to remove; a mask of
another size than its image is resized, nearest, into OUT/inputs/masks/). ``id`` (unique)
defaults to the row number; rows whose ``task`` is given and is not ``remove`` are left out,
so a full export of the test set can be indexed as is. ``reference`` (optional, input-image
pixels row,col) is a background pixel whose curve is copied (Algorithm 1); without it the rate
of the region is minimised (the paper's pseudo-curve, used for >80 of its 100 images).

With the ``datasets`` package installed, DATA may instead be the test set saved locally
(``Dataset.save_to_disk`` folder, or a folder of ``*.parquet`` files exported from it) plus
``--masks MASKS`` holding ``<idx>.png`` per row (``idx`` the dataset's column); its images are
written to OUT/inputs/images/. No download is ever attempted.

What it runs. A seeded random subset (``--limit``, paper: 100) becomes ``remove`` jobs (curve
matching at t=700, lr 0.02, ``--iterations``, default 300) in OUT/JOBS.jsonl, run with
``diffgeo.batch.run_batch`` into OUT/results (rerun to resume). The table: PSNR/SSIM/MSE and MSE
inside/outside the mask from ``diffgeo evaluate``; with ``--clip`` CLIP_dir of the row's
instruction (Eq. 12) and CLIP_sim over the mask (Eq. 13), with ``--dino`` DINO_sim over the
mask (Eq. 14). The paper (Table 1, SD 2.1-base): CLIP_dir 0.2629, CLIP_sim 0.4782,
DINO_sim 0.416 (SD-XL inpainting 0.2617 / 0.4787 / 0.422; ZONE 0.2589 / 0.4824 / 0.433).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

LAYOUT = ("DATA/index.jsonl (or index.csv) with image, mask, instruction per row, paths "
          "relative to DATA (see the recipe's docstring)")
PAPER = "CLIP_dir 0.2629, CLIP_sim 0.4782, DINO_sim 0.416 (Table 1, 100 images, SD 2.1-base)"


def _parse_reference(value: Any, where: str) -> list[int] | None:
    if value is None or value == "":
        return None
    try:
        parts = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2:
        raise SystemExit(f"error: {where}: reference must be row,col, got {value!r}")
    return parts


def read_index(data: Path) -> list[dict[str, Any]]:
    """Rows of DATA/index.jsonl or DATA/index.csv (removal rows only), paths resolved."""
    data = C.require_dir(data, "--data", LAYOUT)
    jl, cs = data / "index.jsonl", data / "index.csv"
    raw: list[tuple[str, dict[str, Any]]] = []
    if jl.is_file():
        for n, line in enumerate(jl.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: --data {jl} line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise SystemExit(f"error: --data {jl} line {n}: expected a JSON object")
            raw.append((f"{jl.name} line {n}", obj))
    elif cs.is_file():
        with open(cs, newline="", encoding="utf-8") as f:
            for n, obj in enumerate(csv.DictReader(f), start=2):
                raw.append((f"{cs.name} line {n}", dict(obj)))
    else:
        raise C.layout_error("--data", data, "no index.jsonl or index.csv", LAYOUT)
    rows = []
    for n, (where, obj) in enumerate(raw, start=1):
        if obj.get("task") not in (None, "", "remove"):
            continue
        missing = [k for k in ("image", "mask") if not obj.get(k)]
        if missing:
            raise SystemExit(f"error: --data {where}: missing {', '.join(missing)}; expected "
                             + LAYOUT)
        image, mask = data / obj["image"], data / obj["mask"]
        for key, p in (("image", image), ("mask", mask)):
            if not p.is_file():
                raise SystemExit(f"error: --data {where}: {key} {p} does not exist")
        rid = str(obj.get("id") or n)
        if any(r["id"] == rid for r in rows):
            raise SystemExit(f"error: --data {where}: duplicate id {rid!r}")
        rows.append({"id": rid, "image": image, "mask": mask,
                     "instruction": str(obj.get("instruction") or ""),
                     "reference": _parse_reference(obj.get("reference"), where)})
    if not rows:
        raise C.layout_error("--data", data, "no removal rows in the index", LAYOUT)
    return rows


def export_hf(data: Path, masks: Path, folder: Path) -> list[dict[str, Any]]:
    """Rows from a locally saved ``facebook/emu_edit_test_set`` (needs ``datasets``)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("error: --masks given but the `datasets` package is not installed; "
                         "use the folder layout: " + LAYOUT) from None
    data = C.require_dir(data, "--data", "a saved dataset folder or *.parquet files")
    masks = C.require_dir(masks, "--masks", "<idx>.png per dataset row")
    parquet = sorted(str(p) for p in data.rglob("*.parquet"))
    if parquet:
        ds = datasets.load_dataset("parquet", data_files=parquet, split="train")
    else:
        ds = datasets.load_from_disk(str(data))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["test"] if "test" in ds else next(iter(ds.values()))
    rows = []
    for n, ex in enumerate(ds):
        if ex.get("task") != "remove":
            continue
        idx = str(ex.get("idx", n))
        mask = masks / f"{idx}.png"
        if not mask.is_file():
            continue
        image = folder / f"{C.job_id(idx)}.png"
        if not image.is_file():
            image.parent.mkdir(parents=True, exist_ok=True)
            ex["image"].convert("RGB").save(image)
        rows.append({"id": idx, "image": image, "mask": mask,
                     "instruction": str(ex.get("instruction") or ""), "reference": None})
    if not rows:
        raise C.layout_error("--masks", masks, "no <idx>.png for any removal row", LAYOUT)
    return rows


def write_jobs(data: Path, out: Path, *, model: str = "default", limit: int | None = 100,
               seed: int = 0, steps: int = 50, fit: str | None = "crop",
               iterations: int | None = None, dtype: str = "float32",
               masks: Path | None = None) -> C.Plan:
    """OUT/JOBS.jsonl with one ``remove`` job per selected row; returns the plan."""
    out = Path(out)
    if masks is not None:
        rows = export_hf(Path(data), Path(masks), out / "inputs" / "images")
    else:
        rows = read_index(Path(data))
    opts = C.job_options(model, fit, seed, dtype)
    plan = C.Plan(files=[out / "JOBS.jsonl"])
    for i in C.choose(len(rows), limit, seed):
        r = rows[i]
        jid = C.job_id("remove", r["id"])
        mask = C.mask_on_image(r["mask"], r["image"], out / "inputs" / "masks", f"{jid}.png")
        job: dict[str, Any] = {"verb": "remove", "id": jid, "image": str(r["image"]),
                               "mask": str(mask), **opts, "t": 700, "steps": steps,
                               "lr": 0.02}
        if iterations is not None:
            job["iterations"] = iterations
        if r["reference"] is not None:
            job["reference"] = r["reference"]
        plan.jobs.append(job)
        plan.extras[jid] = {"text": r["instruction"], "region": str(mask)}
    C.write_jsonl(plan.files[0], plan.jobs)
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = C.parser(__doc__, out="runs/emu-removal", limit=100, steps=50)
    ap.add_argument("--data", type=Path, required=True, help=LAYOUT)
    ap.add_argument("--masks", type=Path, default=None,
                    help="with a saved HF dataset as --data: folder of <idx>.png masks")
    ap.add_argument("--iterations", type=int, default=None,
                    help="curve-matching iterations (default: the remove task's 300)")
    args = ap.parse_args(argv)
    plan = write_jobs(args.data, args.out, model=args.model, limit=args.limit, seed=args.seed,
                      steps=args.steps, fit=args.fit, iterations=args.iterations,
                      dtype=args.dtype, masks=args.masks)
    C.main_flow(plan, args, PAPER)


if __name__ == "__main__":
    main()
