"""Recipe: PIXELS exemplar editing on ImageNet validation pairs (PIXELS Table 1a).

    python benchmarks/recipes/imagenet_exemplars.py --data /path/to/imagenet/val \
        --maps /path/to/edit-maps --model stabilityai/stable-diffusion-2-1-base --limit 3000 \
        --clip openai/clip-vit-base-patch32 --out runs/imagenet-exemplars

Data. ImageNet's validation set (ILSVRC 2012, image-net.org, after accepting its terms) in the
usual class-folder layout ``DATA/<wnid>/<file>.JPEG`` (any .jpg/.jpeg/.png under DATA, one
level of folders or none). ``--exemplars DIR`` takes exemplars from another folder of the same
kind (default: DATA itself; a source is never its own exemplar). ``--maps DIR`` is a folder of
edit maps (grayscale images; 1/white = keep the source, 0/black = take the exemplar; soft
values allowed, as in PIXELS); without it a seeded soft-edged ellipse is drawn per pair. Each
map is resized to its source (bilinear) into OUT/inputs/maps/, since diffgeo needs maps drawn
on the source.

What it runs. ``--limit`` pairs (paper: 3000) drawn with ``--seed``: source n is the n-th of a
seeded permutation of the sources, its exemplar and map drawn from the same generator, so a
seed always gives the same pairs, and a smaller ``--limit`` gives a prefix of a larger one's
pairs. OUT/JOBS.jsonl has one ``exemplar`` job per pair (``--strength``, linear thresholds,
``--steps``), run with ``diffgeo.batch.run_batch`` into OUT/results (rerun to resume). The
table (``diffgeo evaluate``): PSNR/SSIM/MSE source vs result; with ``--clip`` CLIP_sim, CLIP-I
of the whole result against the exemplar and CLIP-I of the edited region (map < 0.5) against the
exemplar (the paper's rule). The paper (Table 1a): PIXELS CLIP-I 91.71 (x100, i.e. 0.9171) and
FID 5.412 (MimicBrush 84.95 / 7.915, IP-Adapter 81.32 / 7.958); FID needs a local Inception
network and is not computed here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

LAYOUT = "ImageNet-val style class folders DATA/<wnid>/<file>.JPEG"
MAP_LAYOUT = "a folder of edit-map images (white = keep the source)"
PAPER = "CLIP-I 91.71 (x100), FID 5.412 (Table 1a, 3000 ImageNet-val pairs)"


def list_images(folder: Path, arg: str, layout: str = LAYOUT) -> list[Path]:
    """Images in ``folder`` and its direct sub-folders, sorted by relative path."""
    folder = C.require_dir(folder, arg, layout)
    found = [p for p in folder.iterdir() if C.is_image(p)]
    for sub in folder.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            found += [p for p in sub.iterdir() if C.is_image(p)]
    if not found:
        raise C.layout_error(arg, folder, "no .JPEG/.jpg/.png images", layout)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def ellipse_map(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A soft map: 0 (take the exemplar) inside a random ellipse, rising linearly to 1 (keep the
    source) over a band of 30% of its radius."""
    h, w = size
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.35) * h, rng.uniform(0.15, 0.35) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.sqrt(((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2)
    return np.clip((d - 1.0) / 0.3, 0.0, 1.0).astype(np.float32)


def pair_up(n_sources: int, exemplars: list[Path], sources: list[Path], n_maps: int,
            limit: int | None, seed: int) -> list[tuple[int, int, int | None]]:
    """(source index, exemplar index, map index or None) per pair, deterministic in ``seed``.

    Sources: a seeded permutation, taken in order (cycled when ``limit`` exceeds the sources);
    per pair one exemplar draw (redrawn while it is the source's own file) and one map draw."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_sources)
    count = n_sources if limit is None else limit
    pairs = []
    for n in range(count):
        s = int(order[n % n_sources])
        if len(exemplars) == 1 and exemplars[0] == sources[s]:
            raise SystemExit(f"error: --exemplars: the only exemplar is the source {sources[s]} "
                             "itself; give more images")
        e = int(rng.integers(len(exemplars)))
        while exemplars[e] == sources[s]:
            e = int(rng.integers(len(exemplars)))
        m = int(rng.integers(n_maps)) if n_maps else None
        pairs.append((s, e, m))
    return pairs


def write_jobs(data: Path, out: Path, *, model: str = "default", limit: int | None = 3000,
               seed: int = 0, steps: int = 50, fit: str | None = "crop",
               exemplars: Path | None = None, maps: Path | None = None, strength: float = 0.8,
               threshold: str = "linear", dtype: str = "float32") -> C.Plan:
    """OUT/JOBS.jsonl with one ``exemplar`` job per seeded pair; maps written to OUT/inputs."""
    out = Path(out)
    sources = list_images(Path(data), "--data")
    ex_list = list_images(Path(exemplars), "--exemplars") if exemplars is not None else sources
    map_list = list_images(Path(maps), "--maps", MAP_LAYOUT) if maps is not None else []
    if limit is not None and limit < 0:
        raise SystemExit(f"error: --limit must be >= 0, got {limit}")
    pairs = pair_up(len(sources), ex_list, sources, len(map_list), limit, seed)
    opts = C.job_options(model, fit, seed, dtype)
    plan = C.Plan(files=[out / "JOBS.jsonl"])
    for n, (s, e, m) in enumerate(pairs):
        src = sources[s]
        jid = C.job_id("pair", f"{n:05d}")
        size = C.image_size(src)
        if m is None:
            # one generator per pair: a pair's map does not depend on the other pairs
            rng = np.random.default_rng([seed, n])
            edit_map = ellipse_map(size, rng)
        else:
            edit_map = C.resize_mask(C.mask_array(map_list[m]), size, smooth=True)
        map_path = C.save_mask(edit_map, out / "inputs" / "maps" / f"{jid}.png")
        plan.jobs.append({"verb": "exemplar", "id": jid, "source": str(src),
                          "exemplar": [str(ex_list[e])], "map": [str(map_path)], **opts,
                          "strength": strength, "steps": steps, "threshold": threshold})
        plan.extras[jid] = {"region": str(map_path), "region_invert": True}
    C.write_jsonl(plan.files[0], plan.jobs)
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = C.parser(__doc__, out="runs/imagenet-exemplars", limit=3000, steps=50)
    ap.add_argument("--data", type=Path, required=True, help="source images: " + LAYOUT)
    ap.add_argument("--exemplars", type=Path, default=None,
                    help="exemplar images, same layout (default: --data)")
    ap.add_argument("--maps", type=Path, default=None, help=MAP_LAYOUT + " (default: ellipses)")
    ap.add_argument("--strength", type=float, default=0.8, help="denoising strength")
    ap.add_argument("--threshold", default="linear",
                    help="PIXELS threshold schedule (linear, quadratic, cubic, log1p, sigmoid)")
    args = ap.parse_args(argv)
    plan = write_jobs(args.data, args.out, model=args.model, limit=args.limit, seed=args.seed,
                      steps=args.steps, fit=args.fit, exemplars=args.exemplars, maps=args.maps,
                      strength=args.strength, threshold=args.threshold, dtype=args.dtype)
    C.main_flow(plan, args, PAPER)


if __name__ == "__main__":
    main()
