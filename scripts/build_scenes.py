"""Rebuild the scene files bundled with diffgeo (src/diffgeo/assets/scenes/).

    python scripts/build_scenes.py [--size 32] [--heldout 64] [--seed 0] [--out DIR]

The training set is never stored: `diffgeo train --data scenes` draws it from the same generator
(split "train"). Only the held-out evaluation scenes (split "heldout") are bundled, so every
machine evaluates on identical scenes even without the emoji font installed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffgeo.data.scenes import SOURCES, SceneConfig, find_emoji_font, generate_scenes, save_scenes

ASSETS = Path(__file__).resolve().parents[1] / "src" / "diffgeo" / "assets" / "scenes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ASSETS,
                    help="folder for heldout-<size>.npz/.json (default: the bundled assets)")
    args = ap.parse_args()
    if find_emoji_font() is None:
        raise SystemExit("the bundled scenes use emoji objects: apt-get install "
                         "fonts-noto-color-emoji (or set DIFFGEO_EMOJI_FONT)")
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = SceneConfig(size=args.size, objects="emoji")
    scenes = list(generate_scenes(args.heldout, seed=args.seed, split="heldout", config=cfg))
    out = args.out / f"heldout-{args.size}.npz"
    save_scenes(out, scenes)
    meta = {"file": out.name, "count": len(scenes), "size": args.size, "seed": args.seed,
            "split": "heldout", "objects": "emoji", "sources": SOURCES,
            "rebuild": "python scripts/build_scenes.py"}
    (args.out / f"heldout-{args.size}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(scenes)} scenes)")


if __name__ == "__main__":
    main()
