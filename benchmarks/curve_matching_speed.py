"""Curve matching, fast vs faithful: seconds per iteration and the loss trajectories.

    python benchmarks/curve_matching_speed.py [--scenes 2] [--iterations 30] [--threads 1]

On the default model and bundled held-out scenes (object removal with a background reference
pixel, t = 700, 50-step grid). ``faithful`` re-integrates X_t → X_tk without gradients every
iteration, as the paper does; ``fast`` reuses the path computed at the last refresh
(``refresh_every``). The two runs of a scene alternate, so the time ratio comes from one run;
the final losses (mean of the last 10 iterations) are compared too.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from diffgeo.backbones import load_backbone
from diffgeo.curves import salient_and_background_pixels
from diffgeo.data import bundled_scenes
from diffgeo.editing import tasks
from diffgeo.editing.curve_matching import CurveMatchingConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--refresh-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone(args.model)
    rows = []
    for i, scene in enumerate(bundled_scenes(bb.image_size[0])[: args.scenes]):
        x = torch.from_numpy(scene.composite).permute(2, 0, 1)[None] * 2 - 1
        _, ref = salient_and_background_pixels(scene.mask, np.random.default_rng(i))
        out = {}
        for mode in ("faithful", "fast"):
            cfg = CurveMatchingConfig(iterations=args.iterations, mode=mode,
                                      refresh_every=args.refresh_every, seed=i)
            t0 = time.perf_counter()
            res = tasks.remove(bb, x, scene.mask, ref, cfg)
            secs = time.perf_counter() - t0
            out[mode] = {"seconds": secs, "per_iteration": secs / args.iterations,
                         "final_loss": float(np.mean(res.losses[-10:])),
                         "losses": res.losses}
        rows.append(out)
        f, s = out["faithful"], out["fast"]
        print(f"scene {i}: faithful {f['per_iteration']:.2f} s/it, fast {s['per_iteration']:.2f}"
              f" s/it ({f['seconds'] / s['seconds']:.1f}x); final loss faithful "
              f"{f['final_loss']:.4g}, fast {s['final_loss']:.4g}")
    ratio = np.mean([r["faithful"]["seconds"] / r["fast"]["seconds"] for r in rows])
    rel = np.mean([abs(r["fast"]["final_loss"] - r["faithful"]["final_loss"])
                   / max(r["faithful"]["final_loss"], 1e-12) for r in rows])
    print(f"mean speed-up {ratio:.1f}x; mean relative final-loss difference {100 * rel:.1f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "speedup": ratio, "final_loss_rel_diff": rel,
                       "iterations": args.iterations, "refresh_every": args.refresh_every,
                       "threads": torch.get_num_threads(),
                       "date": time.strftime("%Y-%m-%d %H:%M")}, fh, indent=2)


if __name__ == "__main__":
    main()
