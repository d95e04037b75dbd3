"""Accuracy and cost of cheap tangent bases against fully converged ones, along a DDIM inversion.

    python benchmarks/tangent_accuracy.py [--threads 1] [--steps 50] [--t T] [--k 3]
        [--oversample 4] [--passes 1 2] [--ref-tol 1e-6] [--dtype float32] [--json FILE]

DESIGN.md §4 says the tangent basis is the real cost of a projected generation-rate map and
proposes a randomized range finder (oversampling, one or two power passes) warm-started from the
previous timestep. This script measures what that buys and costs, on the embedded default model
(32x32 pixels, 3072 state dimensions) along a DDIM inversion of a bundled held-out scene:

- ``reference``: cold start with ``ref-oversample`` extra vectors (faster contraction),
  iterated until every Ritz pair's residual ‖JᵀJv − σ²v‖ is <= ref-tol·σ² (its own reported
  error bound is in the JSON);
- ``reference s1``: the same from another random start (seed 1): its distance to ``reference`` is
  the accuracy floor of every comparison below;
- ``cold default``: what ``tangent_basis`` does with its defaults (k vectors plus the one
  oversampling vector that measures the gap; tol 1e-4, max_iter 50);
- ``warm qN``: ``power_passes=N`` with ``oversample`` extra vectors, each timestep warm-started
  from the previous one of the same chain (the first timestep of the path has nothing to start
  from and iterates to convergence at tol 1e-4, as ``tangent_bases_along`` does; it is reported
  separately since its cost is paid once per path);
- ``warm tol``: warm-started as above but iterated to the default tolerance (1e-4) instead of a
  fixed number of passes: the stopping rule guarantees the accuracy, the warm start the cost;
- ``cold q2``: the randomized range finder without the warm start.

Accuracy of each method vs the reference, per timestep: the largest principal angle between the
k-dimensional spans, the largest relative singular-value error, and the method's own reported
``error_bound`` (how often it covered the measured angle is in the summary). Every method runs
at every timestep before the next timestep starts, in an order that rotates with the timestep,
so the time ratios come from one run under the same (shared-machine) load. Each method has its
own generator, so results do not depend on that order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from diffgeo import sampling
from diffgeo.backbones import load_backbone
from diffgeo.data import bundled_scenes
from diffgeo.data.scenes import scenes_to_tensor
from diffgeo.tangent import TangentBasis, principal_angles, tangent_basis


def sv_error(b: TangentBasis, ref: TangentBasis) -> float:
    return float(((b.singular_values - ref.singular_values).abs()
                  / ref.singular_values.clamp_min(1e-30)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--scene", type=int, default=0, help="index into bundled_scenes(32)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps over the 1000 timesteps")
    ap.add_argument("--t", type=int, default=None,
                    help="invert up to this grid timestep (default: the last grid point)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--oversample", type=int, default=4)
    ap.add_argument("--passes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ref-tol", type=float, default=1e-6)
    ap.add_argument("--ref-max-iter", type=int, default=300)
    ap.add_argument("--ref-oversample", type=int, default=8)
    ap.add_argument("--per-step", action="store_true", help="print one line per timestep")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bb = load_backbone(args.model, device=args.device, dtype=args.dtype)
    scene = bundled_scenes(bb.image_size[0])[args.scene]
    x0 = scenes_to_tensor([scene]).to(bb.device, bb.dtype)
    grid = list(sampling.Grid.for_model(bb, args.steps))
    t_stop = grid[-1] if args.t is None else args.t
    traj = sampling.invert(bb, x0, t_stop, args.steps)
    steps = [(t, x) for t, x in zip(traj.timesteps, traj.states, strict=True) if t is not None]
    k, p = args.k, args.oversample

    ref_kw = dict(tol=args.ref_tol, max_iter=args.ref_max_iter, oversample=args.ref_oversample)
    methods: dict[str, dict[str, Any]] = {
        "reference": dict(ref_kw),
        "reference s1": dict(ref_kw, seed=1),
        "cold default": dict(),
    }
    for q in args.passes:
        methods[f"warm q{q} p{p}"] = dict(oversample=p, power_passes=q, warm=True)
    methods[f"warm tol p{p}"] = dict(oversample=p, warm=True)
    methods[f"cold q2 p{p}"] = dict(oversample=p, power_passes=2)
    gens = {name: torch.Generator().manual_seed(m.pop("seed", 0)) for name, m in methods.items()}
    prev: dict[str, TangentBasis | None] = {name: None for name in methods}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    names = list(methods)

    # warm-up: the first derivative call pays one-off costs (torch.func imports, allocations)
    tangent_basis(bb, steps[0][1], steps[0][0], k=k, power_passes=1)

    print(f"model {args.model} ({bb.state_shape}, {args.dtype}), scene {args.scene} "
          f"'{scene.object_name}', {len(steps)} timesteps {steps[0][0]}..{steps[-1][0]}, "
          f"k={k}, threads={torch.get_num_threads()}", flush=True)
    for i, (t, x) in enumerate(steps):
        order = names[i % len(names):] + names[:i % len(names)]
        result: dict[str, TangentBasis] = {}
        secs: dict[str, float] = {}
        for name in order:
            kw = dict(methods[name])
            warm = kw.pop("warm", False)
            init = prev[name] if warm else None
            if warm and init is None:  # first timestep of a warm chain: converge, like
                kw["power_passes"] = None  # tangent_bases_along(converge_first=True)
            t0 = time.perf_counter()
            b = tangent_basis(bb, x, t, k=k, init=init, generator=gens[name], **kw)
            secs[name] = time.perf_counter() - t0
            result[name] = b
            prev[name] = b
        ref = result["reference"]
        for name, b in result.items():
            rows[name].append(dict(
                t=t, seconds=secs[name], passes=b.iterations, converged=b.converged,
                error_bound=b.error_bound, jvps=b.settings["jvps"], vjps=b.settings["vjps"],
                angle=float(principal_angles(b, ref).max()), sv_error=sv_error(b, ref),
                first_of_chain=bool(methods[name].get("warm")) and i == 0,
            ))
        if args.per_step:
            print(f"t={t:4d} ref {secs['reference']:.2f}s ({ref.iterations} passes, "
                  f"sv {[round(float(s), 3) for s in ref.singular_values]}) | "
                  + " | ".join(f"{n}: {rows[n][-1]['seconds']:.2f}s "
                               f"{rows[n][-1]['angle']:.3f}rad" for n in names[1:]), flush=True)

    ref_med = statistics.median(r["seconds"] for r in rows["reference"])
    summary = {}
    for name in names:
        rs = [r for r in rows[name] if not r["first_of_chain"]]
        med = statistics.median(r["seconds"] for r in rs)
        summary[name] = dict(
            median_seconds=med, mean_seconds=statistics.fmean(r["seconds"] for r in rs),
            total_seconds=sum(r["seconds"] for r in rows[name]),
            speedup_vs_reference=ref_med / med,
            mean_products=statistics.fmean(r["jvps"] + r["vjps"] for r in rs),
            median_angle=statistics.median(r["angle"] for r in rs),
            max_angle=max(r["angle"] for r in rs),
            median_sv_error=statistics.median(r["sv_error"] for r in rs),
            # vs the reference, which has an error of its own: a near-miss is not a violation
            bound_covers_angle=statistics.fmean(
                r["error_bound"] is not None and r["angle"] <= r["error_bound"] for r in rs),
            max_sv_error=max(r["sv_error"] for r in rs),
            unconverged=(sum(not r["converged"] for r in rs)
                         if methods[name].get("power_passes") is None else None),
            first_timestep_seconds=rows[name][0]["seconds"] if methods[name].get("warm") else None,
        )

    hdr = (f"{'method':16s} {'s/step (med)':>12s} {'speedup':>8s} {'JVP+VJP':>8s} "
           f"{'angle med':>10s} {'angle max':>10s} {'sv err med':>10s} {'sv err max':>10s}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for name, s in summary.items():
        print(f"{name:16s} {s['median_seconds']:12.3f} {s['speedup_vs_reference']:7.1f}x "
              f"{s['mean_products']:8.1f} {s['median_angle']:10.2e} {s['max_angle']:10.2e} "
              f"{s['median_sv_error']:10.2e} {s['max_sv_error']:10.2e}")
    print("(angles in radians vs the reference; warm chains exclude their first timestep, which "
          "iterates to convergence: "
          + ", ".join(f"{n} {s['first_timestep_seconds']:.2f}s" for n, s in summary.items()
                      if s["first_timestep_seconds"] is not None) + ")")
    unconv = {n: s["unconverged"] for n, s in summary.items() if s["unconverged"]}
    if unconv:
        print(f"timesteps that hit max_iter without meeting the tolerance: {unconv}")

    if args.json:
        report = dict(
            settings=vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
            date=time.strftime("%Y-%m-%d %H:%M"), model_state_shape=list(bb.state_shape),
            scene=scene.object_name, timesteps=[t for t, _ in steps],
            methods={n: {kk: vv for kk, vv in m.items()} for n, m in methods.items()},
            summary=summary, per_timestep=rows,
        )
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
