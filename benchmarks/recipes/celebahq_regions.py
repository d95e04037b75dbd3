"""Recipe: region-based editing (RBE) on CelebA-HQ with face-part masks (RBE Tables 1-2).

    python benchmarks/recipes/celebahq_regions.py --data /path/to/CelebAMask-HQ \
        --model google/ddpm-ema-celebahq-256 --regions eyes,mouth --limit 500 --out runs/celebahq

Data. CelebAMask-HQ (Lee et al., 2020; the authors' GitHub page / Google Drive) as it unpacks::

    DATA/CelebA-HQ-img/<i>.jpg                                  image i (0..29999), 1024x1024
    DATA/CelebAMask-HQ-mask-anno/<k>/<iiiii>_<part>.png         part masks, 512x512,
        k = i // 2000, iiiii = i on 5 digits, part in hair, l_eye, r_eye, mouth, u_lip, l_lip,
        nose, skin, l_brow, r_brow, ...

A region is the union of its parts (``--regions`` names from REGIONS below, or ``name=part+part``
for your own), resized (nearest) to the image and written to OUT/inputs/masks/. Images without
any part of a region are skipped for it.

What it runs. A seeded random subset of images (``--limit``, paper: 500). Phase 1,
OUT/JOBS-1-directions.jsonl: per region and image a ``directions`` job (invert to t=500 with 40
DDIM steps, k=3 power-iteration directions of the masked h-space Jacobian, projected against
the unmasked one; previews at ±``--strength``). Phase 2, OUT/JOBS-2-apply.jsonl: an ``apply``
job editing the image along direction ``--index`` at strengths -S, +S (Asyrp-style, x0 term
only), the locality measured in the region. With ``--shared`` the directions are discovered on
the first selected image only and applied to every image (the paper: the mask is used for
discovery only). Both run with ``diffgeo.batch.run_batch`` into OUT/results (rerun to resume;
under ``accelerate launch`` the phases are separated by a barrier).

The table (``diffgeo evaluate``): per strength ("apply (α=S)") PSNR, SSIM, MSE over the image and
MSE inside / outside the region (reconstruction vs edit). The paper reports FID, ArcFace ID,
MSE (×1e-4) and LPIPS: for 'smile' (mouth) FID 14.22, ID 0.8627, MSE 5.74, LPIPS 0.0289;
close / open eyes MSE 5.86 / 6.06 (Tables 1-2, DDPM on CelebA-HQ 256). FID, ID and LPIPS are
not computed here (no local weights are assumed).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

IMAGES, ANNO = "CelebA-HQ-img", "CelebAMask-HQ-mask-anno"
LAYOUT = (f"DATA/{IMAGES}/<i>.jpg and DATA/{ANNO}/<i // 2000>/<iiiii>_<part>.png "
          "(CelebAMask-HQ)")
REGIONS: dict[str, tuple[str, ...]] = {
    "eyes": ("l_eye", "r_eye"), "mouth": ("mouth", "u_lip", "l_lip"),
    "brows": ("l_brow", "r_brow"), "nose": ("nose",), "hair": ("hair",), "skin": ("skin",),
    "ears": ("l_ear", "r_ear"),
}
PAPER = ("smile (mouth): FID 14.22, ID 0.8627, MSE 5.74e-4, LPIPS 0.0289; eyes MSE "
         "5.86e-4 / 6.06e-4 (Tables 1-2, DDPM CelebA-HQ 256)")


def parse_regions(text: str) -> dict[str, tuple[str, ...]]:
    """``eyes,mouth`` or ``lips=u_lip+l_lip,eyes`` -> {name: parts}."""
    out: dict[str, tuple[str, ...]] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" in item:
            name, parts = item.split("=", 1)
            out[name.strip()] = tuple(p.strip() for p in parts.split("+") if p.strip())
        elif item in REGIONS:
            out[item] = REGIONS[item]
        else:
            out[item] = (item,)  # a single CelebAMask-HQ part, e.g. "hair"
    if not out or any(not v for v in out.values()):
        raise SystemExit(f"error: --regions {text!r}: give names among {', '.join(REGIONS)} "
                         "or name=part+part")
    return out


def list_images(data: Path) -> list[int]:
    data = C.require_dir(data, "--data", LAYOUT)
    if not (data / IMAGES).is_dir():
        raise C.layout_error("--data", data, f"no {IMAGES}/ folder", LAYOUT)
    if not (data / ANNO).is_dir():
        raise C.layout_error("--data", data, f"no {ANNO}/ folder", LAYOUT)
    ids = sorted(int(p.stem) for p in (data / IMAGES).glob("*.jpg") if p.stem.isdigit())
    if not ids:
        raise C.layout_error("--data", data / IMAGES, "no <i>.jpg images", LAYOUT)
    return ids


def part_file(data: Path, i: int, part: str) -> Path:
    return data / ANNO / str(i // 2000) / f"{i:05d}_{part}.png"


def region_mask(data: Path, i: int, parts: tuple[str, ...], dest: Path) -> Path | None:
    """The union of the image's part masks at the image's size, written to ``dest`` (None when
    the image has none of the parts)."""
    files = [f for f in (part_file(data, i, p) for p in parts) if f.is_file()]
    if not files:
        return None
    union = np.maximum.reduce([C.mask_array(f) >= 0.5 for f in files]).astype(np.float32)
    if not union.any():
        return None
    size = C.image_size(data / IMAGES / f"{i}.jpg")
    return C.save_mask(C.resize_mask(union, size), dest)


def write_jobs(data: Path, out: Path, *, model: str = "default", limit: int | None = 500,
               seed: int = 0, steps: int = 40, fit: str | None = "crop",
               regions: dict[str, tuple[str, ...]] | None = None, t: int = 500, k: int = 3,
               strength: float = 30.0, index: int = 0, shared: bool = False,
               dtype: str = "float32") -> C.Plan:
    """Phase files OUT/JOBS-1-directions.jsonl and OUT/JOBS-2-apply.jsonl."""
    data, out = Path(data), Path(out)
    regions = regions or {"eyes": REGIONS["eyes"], "mouth": REGIONS["mouth"]}
    ids = list_images(data)
    chosen = [ids[j] for j in C.choose(len(ids), limit, seed)]
    opts = C.job_options(model, fit, seed, dtype)
    results = out / C.RESULTS
    plan = C.Plan(files=[out / "JOBS-1-directions.jsonl", out / "JOBS-2-apply.jsonl"])
    discover: list[dict[str, Any]] = []
    apply: list[dict[str, Any]] = []
    strengths = [-float(strength), float(strength)]
    for name, parts in regions.items():
        source_id = None
        for i in chosen:
            mask = region_mask(data, i, parts, out / "inputs" / "masks" / f"{i:05d}-{name}.png")
            if mask is None:
                continue
            image = str(data / IMAGES / f"{i}.jpg")
            if not shared or source_id is None:
                source_id = C.job_id("directions", name, f"{i:05d}")
                discover.append({"verb": "directions", "id": source_id, "image": image,
                                 "mask": str(mask), **opts, "t": t, "steps": steps,
                                 "k": k, "preview": strengths})
            aid = C.job_id("apply", name, f"{i:05d}")
            apply.append({"verb": "apply", "id": aid, "image": image,
                          "directions": str(results / source_id / "directions"), **opts,
                          "index": index, "strength": strengths, "mask": str(mask)})
        if source_id is None:
            print(f"note: no selected image has a {name} mask ({'+'.join(parts)})")
    if not apply:
        raise C.layout_error("--data", data / ANNO, "no part masks for the selected images and "
                             f"regions {', '.join(regions)}", LAYOUT)
    C.write_jsonl(plan.files[0], discover)
    C.write_jsonl(plan.files[1], apply)
    plan.jobs = discover + apply
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = C.parser(__doc__, out="runs/celebahq", limit=500, steps=40)
    ap.add_argument("--data", type=Path, required=True, help=LAYOUT)
    ap.add_argument("--regions", default="eyes,mouth",
                    help=f"comma-separated: {', '.join(REGIONS)}, a part, or name=part+part")
    ap.add_argument("--t", type=int, default=500, help="inversion depth (paper: 500)")
    ap.add_argument("--k", type=int, default=3, help="directions per region (paper: 3)")
    ap.add_argument("--strength", type=float, default=30.0, help="edit scale ±S (paper: 30)")
    ap.add_argument("--index", type=int, default=0, help="which direction to apply")
    ap.add_argument("--shared", action="store_true",
                    help="discover on the first selected image, apply to all")
    args = ap.parse_args(argv)
    plan = write_jobs(args.data, args.out, model=args.model, limit=args.limit, seed=args.seed,
                      steps=args.steps, fit=args.fit, regions=parse_regions(args.regions),
                      t=args.t, k=args.k, strength=args.strength, index=args.index,
                      shared=args.shared, dtype=args.dtype)
    C.main_flow(plan, args, PAPER)


if __name__ == "__main__":
    main()
