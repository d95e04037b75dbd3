"""Curve matching, fast vs faithful: seconds per iteration and the loss trajectories.

    python benchmarks/curve_matching_speed.py [--scenes 2] [--iterations 30] [--threads 1]
    python benchmarks/curve_matching_speed.py --sd sd21 --device cuda --iterations 300

Variants, run alternately per scene so every ratio comes from one run under the same load:
``faithful`` (the paper: re-integrates X_t → X_tk without gradients every iteration, one
(pixel, timestep) pair per iteration), ``fast/1`` (reuses the path computed at the last refresh,
one pair; ``fast/1 exact`` with the paper's exact JVP, ``fast/1`` with fast mode's default central
difference) and ``fast/4`` (the default: four pairs in one batched call). Seconds per iteration and
per pair are reported, with the final loss (mean of the last 10 iterations), and the cost
model of each variant: one iteration split into its phases (``CurveMatchingResult.cost``: path
walk, drift re-walks, refresh curves, the rates' JVP with the loss, the backward pass through it,
Adam and blends) in seconds and in forward-pass equivalents (the phase's time over one batch-1
no-grad ε forward of the same model, timed just before each variant: machine-independent to first
order), and the network calls its walks made per iteration. Speed-ups against faithful/1 are
given end to end (wall seconds over iterations, the one-time setup and final decode included)
and for the loop alone (the sum of the per-iteration phases: what each further iteration costs).

Default model: object removal with a background reference pixel on the bundled held-out scenes
(t = 700, 50-step grid). ``--sd small|sd15|sd21``: a randomly initialised SD-shaped U-Net
(``random_sd.py``; ``sd21`` is the SD 2.1-base configuration at 512×512, the issue's GPU
benchmark; compute does not depend on weight values) on a random image with a centred square
region, minimising the rate.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from jacobian_cost import forward_seconds
from random_sd import KINDS, sd_backbone

from diffgeo.backbones import load_backbone
from diffgeo.curves import salient_and_background_pixels
from diffgeo.data import bundled_scenes
from diffgeo.editing import tasks
from diffgeo.editing.curve_matching import CurveMatchingConfig, curve_matching

#: (mode, pairs, derivative): None is the mode's default (fast: the central difference, faithful:
#: the exact JVP); "fast/1 exact" isolates what the difference derivative saves.
VARIANTS = (("faithful", 1, None), ("fast", 1, "exact"), ("fast", 1, None), ("fast", 4, None))


def variant_name(mode: str, pairs: int, derivative: str | None) -> str:
    return f"{mode}/{pairs}" + (f" {derivative}" if derivative else "")
#: The per-iteration phases of the cost model (setup and the final decode are reported apart).
LOOP_PHASES = ("walk", "re-walk", "curves", "derivative", "backward", "update")


def cost_model(res, iterations: int, forward: float) -> dict:
    """Per-iteration seconds and forward equivalents of each loop phase, with walk steps."""
    phases = res.cost["phases"]
    per_it = {k: phases[k]["seconds"] / iterations for k in LOOP_PHASES if k in phases}
    return {"per_iteration_seconds": per_it,
            "loop_seconds_per_iteration": sum(per_it.values()),
            "forward_seconds": forward,
            "per_iteration_forwards": {k: v / forward for k, v in per_it.items()},
            "setup_forwards": phases["setup"]["seconds"] / forward,
            "decode_forwards": phases["decode"]["seconds"] / forward,
            "walk_steps_per_iteration": res.cost["walk_steps"] / iterations,
            "rewalk_steps_per_iteration": res.cost["rewalk_steps"] / iterations,
            "path_steps": res.cost["path_steps"]}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _jobs(args: argparse.Namespace):
    """(backbone, [(name, run(cfg) -> result)]) for the chosen model."""
    if args.sd:
        bb = sd_backbone(args.sd, args.device)
        H, W = bb.image_size
        gen = torch.Generator().manual_seed(0)
        region = np.zeros((H, W), np.float32)
        region[H // 4:3 * H // 4, W // 4:3 * W // 4] = 1
        jobs = []
        for i in range(args.scenes):
            x = torch.rand(1, 3, H, W, generator=gen) * 2 - 1
            jobs.append((f"random image {i}", lambda cfg, x=x: curve_matching(
                bb, x, region, CurveMatchingConfig(**{**cfg.__dict__, "loss": "minimize"}))))
        return bb, jobs
    bb = load_backbone(args.model, device=args.device)
    jobs = []
    for i, scene in enumerate(bundled_scenes(bb.image_size[0])[: args.scenes]):
        x = torch.from_numpy(scene.composite).permute(2, 0, 1)[None] * 2 - 1
        _, ref = salient_and_background_pixels(scene.mask, np.random.default_rng(i))
        jobs.append((f"scene {i}", lambda cfg, x=x, m=scene.mask, r=ref:
                     tasks.remove(bb, x, m, r, cfg)))
    return bb, jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--sd", default=None, choices=KINDS,
                    help="Use a randomly initialised SD-shaped U-Net instead of --model.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--refresh-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--walk-dtype", default=None,
                    help="Walks in bfloat16/float16 (CurveMatchingConfig.walk_dtype).")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb, jobs = _jobs(args)
    rows = []
    forwards = []
    for i, (name, run) in enumerate(jobs):
        out = {}
        for mode, pairs, derivative in VARIANTS:
            cfg = CurveMatchingConfig(iterations=args.iterations, mode=mode,
                                      refresh_every=args.refresh_every, seed=i,
                                      pixels_per_iteration=pairs, walk_dtype=args.walk_dtype,
                                      derivative=derivative)
            # each variant's unit is timed just before it, so a load that changes during the
            # run (another job on the machine) scales its unit and its phases alike
            forward = forward_seconds(bb, args.device, reps=5)
            forwards.append(forward)
            _sync(args.device)
            t0 = time.perf_counter()
            res = run(cfg)
            _sync(args.device)
            secs = time.perf_counter() - t0
            out[variant_name(mode, pairs, derivative)] = {
                "seconds": secs, "per_iteration": secs / args.iterations,
                "per_pair": secs / (args.iterations * pairs),
                "final_loss": float(np.mean(res.losses[-10:])), "losses": res.losses,
                "derivative": res.settings["derivative"],
                "cost": cost_model(res, args.iterations, forward)}
        rows.append(out)
        f = out["faithful/1"]
        print(f"{name}: " + ", ".join(
            f"{k} {v['per_iteration']:.3g} s/it ({f['seconds'] / v['seconds']:.2f}x, "
            f"{v['per_pair']:.3g} s/pair, final loss {v['final_loss']:.4g})"
            for k, v in out.items()), flush=True)
        for k, v in out.items():
            c = v["cost"]
            print(f"  {k} per iteration, in forward passes ({c['forward_seconds'] * 1e3:.1f} "
                  f"ms each): "
                  + ", ".join(f"{p} {f:.2f}" for p, f in c["per_iteration_forwards"].items())
                  + f"; walk steps {c['walk_steps_per_iteration']:.1f} + re-walk "
                  f"{c['rewalk_steps_per_iteration']:.1f} (whole path {c['path_steps']})",
                  flush=True)
    summary = {}

    def loop(v: dict) -> float:
        return v["cost"]["loop_seconds_per_iteration"]

    for variant in VARIANTS[1:]:
        k = variant_name(*variant)
        summary[k] = {
            "speedup_per_iteration": float(np.mean(
                [r["faithful/1"]["seconds"] / r[k]["seconds"] for r in rows])),
            "speedup_per_pair": float(np.mean(
                [r["faithful/1"]["per_pair"] / r[k]["per_pair"] for r in rows])),
            # The loop alone: what each further iteration costs once the one-time setup
            # (inversion, the original path and its curves) and the final decode are
            # paid; a short run's end-to-end ratio is diluted by them.
            "loop_speedup_per_iteration": float(np.mean(
                [loop(r["faithful/1"]) / loop(r[k]) for r in rows])),
            "loop_speedup_per_pair": float(np.mean(
                [loop(r["faithful/1"]) / loop(r[k]) * variant[1] for r in rows])),
            "final_loss_rel_diff": float(np.mean(
                [abs(r[k]["final_loss"] - r["faithful/1"]["final_loss"])
                 / max(r["faithful/1"]["final_loss"], 1e-12) for r in rows]))}
        print(f"{k} vs faithful/1: {summary[k]['speedup_per_iteration']:.2f}x per iteration, "
              f"{summary[k]['speedup_per_pair']:.2f}x per pair end to end; the loop alone "
              f"{summary[k]['loop_speedup_per_iteration']:.2f}x per iteration, "
              f"{summary[k]['loop_speedup_per_pair']:.2f}x per pair; mean relative final-loss "
              f"difference {100 * summary[k]['final_loss_rel_diff']:.1f}%")
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu, {torch.get_num_threads()} threads")
    print(f"model: {bb.name}; device: {device}; "
          f"{args.iterations} iterations, refresh every {args.refresh_every}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "summary": summary, "model": bb.name, "device": device,
                       "iterations": args.iterations, "refresh_every": args.refresh_every,
                       "forward_seconds": forwards, "walk_dtype": args.walk_dtype,
                       "date": time.strftime("%Y-%m-%d %H:%M")}, fh, indent=2)


if __name__ == "__main__":
    main()
