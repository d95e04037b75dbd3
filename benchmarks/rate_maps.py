"""Whole-image generation-rate maps against the per-pixel JVP loop the papers imply.

    python benchmarks/rate_maps.py [--threads 1] [--reps 1] [--models default random64]
        [--pixels-subset N] [--t 500] [--k 3] [--oversample 4] [--basis-max-iter N]
        [--target-rel-std 0.1] [--json FILE]

DESIGN.md §4: a projected rate map costs k JVPs after the tangent basis (the k×k Gram form of
``diffgeo.maps``), and the unprojected ‖D h[e_i]‖ map costs K probe VJPs (or nothing beyond the
basis, for the low-rank lower bound), where the papers take one JVP per pixel. This script
measures both on

- ``default``: the shipped 32x32 pixel model, at the DDIM-inversion state at t (50-step grid) of
  the bundled held-out scene ``bundled_scenes(32)[0]``;
- ``random64``: a randomly initialised ``UNet2DModel`` with the block structure of
  ``MODEL_PRESETS["default-32"]`` at sample_size 64 (compute does not depend on the weight
  values), at the DDIM-inversion state at t of a uniformly random image.

What is compared, per model (``rate_map`` with estimator X vs estimator ``loop``):

- ``exact``, ``eps``, ``h-proj``: ``gram`` vs ``loop``, both given the *same* tangent basis, so
  the time ratio is that of the map computation itself. The basis (``tangent_basis(k, oversample,
  output="h")``, cold start, iterated to its default tolerance) is timed separately; the
  "end-to-end" ratio adds it to both sides (the loop needs it too).
- ``h``: ``probe`` with K = ceil(1 / (2 · target²)) probes (the per-cell relative std of the
  probe estimate of the rate is ≈ sqrt(1/(2K)), so target 0.1 → K = 50) and ``lowrank`` (the
  top-k singular pairs of the same basis: a lower bound, exact only if rank J ≤ k) vs ``loop``
  (one JVP of e_i per cell, no basis). The end-to-end ratio of ``lowrank`` charges it the basis.

Errors are per cell, |fast - loop| / loop: maximum, 90th percentile and median.

The loop over every cell is slow on a CPU (4096 cells at 64x64). ``--pixels-subset N`` runs the
loop on N random cells only (the same cells for every definition), extrapolates its time
linearly to all cells (marked ``*`` in the table and ``loop_extrapolated`` in the JSON) and
measures the errors on those N cells. Default: the full loop at 32x32 and 512 cells at 64x64;
``--pixels-subset 0`` runs every loop in full. Each repetition runs every estimator of a
definition around its loop (fast, loop, fast), so the time ratios come from one run under the
same (shared-machine) load; the table reports medians.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch

from diffgeo import sampling
from diffgeo.backbones import PixelBackbone, load_backbone
from diffgeo.backbones.base import Backbone
from diffgeo.curves import previous_level, rates_at
from diffgeo.data import bundled_scenes
from diffgeo.data.scenes import scenes_to_tensor
from diffgeo.jacobian import batched_jvp, batched_vjp
from diffgeo.maps import rate_map
from diffgeo.tangent import TangentBasis, tangent_basis
from diffgeo.train import MODEL_PRESETS, ddpm_scheduler

PROJECTED = ("exact", "eps", "h-proj")
DEFAULT_SUBSET = {"default": None, "random64": 512}


def random_backbone(size: int, device: str) -> PixelBackbone:
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(**dict(MODEL_PRESETS["default-32"], sample_size=size))
    return PixelBackbone(unet, ddpm_scheduler().alphas_cumprod, device=device,
                         name=f"random UNet2DModel (default-32 blocks, {size}x{size})")


def model_and_state(name: str, args: argparse.Namespace
                    ) -> tuple[Backbone, torch.Tensor, int | None, str]:
    """Backbone, state at t (batch 1), the level its generation step lands on, a description."""
    if name == "default":
        bb = load_backbone("default", device=args.device)
        scene = bundled_scenes(bb.image_size[0])[0]
        x0 = scenes_to_tensor([scene])
        what = f"bundled scene 0 '{scene.object_name}'"
    else:
        bb = random_backbone(args.size, args.device)
        g = torch.Generator().manual_seed(args.seed)
        x0 = torch.rand(1, *bb.state_shape, generator=g) * 2 - 1
        what = "uniform random image"
    return (bb, *state_at(bb, x0, args.t, args.steps), what)


def state_at(bb: Backbone, x0: torch.Tensor, t: int, steps: int
             ) -> tuple[torch.Tensor, int | None]:
    """The DDIM-inversion state at t of the state x0 (``steps`` over the timesteps) and the
    level its generation step lands on."""
    with torch.no_grad():
        traj = sampling.invert(bb, x0.to(bb.device, bb.dtype), t, steps)
    return traj.at(t), previous_level(bb, traj, t)


def subset_directions(bb: Backbone, cells: torch.Tensor) -> torch.Tensor:
    """The unit directions of the given flat cell indices (all channels), like
    ``diffgeo.maps.cell_directions(bb)[cells]`` without building all h·w of them."""
    C, h, w = bb.state_shape
    d = torch.zeros(len(cells), C, h * w, dtype=bb.dtype)
    d[torch.arange(len(cells)), :, cells] = C**-0.5
    return d.reshape(len(cells), C, h, w).to(bb.device)


def loop_values(bb: Backbone, x: torch.Tensor, t: int, definition: str,
                basis: TangentBasis | None, t_prev: int | None, cells: torch.Tensor | None,
                chunk: int) -> torch.Tensor:
    """The per-pixel loop: over every cell (``rate_map(..., "loop")``) or over ``cells`` only
    (the same calls on a subset of the directions). Returns flat values over the cells."""
    if cells is None:
        return rate_map(bb, x, t, definition, "loop", basis, t_prev, chunk=chunk).values.flatten()
    dirs = subset_directions(bb, cells)
    vals = torch.cat([rates_at(bb, x, t, dirs[s:s + 256], definition, basis, t_prev,
                               chunk=chunk, per_direction=True)
                      for s in range(0, len(dirs), 256)])
    return vals.float().cpu()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def rel_errors(fast: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    f, r = fast.double(), ref.double()
    rel = (f - r).abs() / r.abs().clamp_min(1e-12 * float(r.abs().max()))
    signed = f / r.clamp_min(1e-12 * float(r.abs().max())) - 1
    return dict(max=float(rel.max()), p90=float(rel.quantile(0.9)), median=float(rel.median()),
                mean_signed=float(signed.mean()), std_signed=float(signed.std()))


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return measure_at(name, *model_and_state(name, args), args)


def measure_at(name: str, bb: Backbone, x: torch.Tensor, t_prev: int | None, what: str,
               args: argparse.Namespace) -> dict[str, Any]:
    """Every estimator against the per-pixel loop at the state x (at ``args.t``), with the
    settings of ``args`` (this script's options)."""
    t = args.t
    C, h, w = bb.state_shape
    n_cells = h * w
    subset = (args.pixels_subset if args.pixels_subset is not None
              else DEFAULT_SUBSET.get(name, 512))
    if subset is not None and (subset <= 0 or subset >= n_cells):
        subset = None
    cells = None
    if subset is not None:
        g = torch.Generator().manual_seed(args.seed)
        cells = torch.randperm(n_cells, generator=g)[:subset].sort().values
    n_loop = n_cells if cells is None else len(cells)
    K = args.probes or math.ceil(1.0 / (2.0 * args.target_rel_std**2))
    print(f"\n== {name}: {bb.name or 'default'}; state {tuple(bb.state_shape)}, h "
          f"{tuple(bb.h_shape())}; {what} inverted to t={t} (t_prev={t_prev}); loop over "
          f"{n_loop}/{n_cells} cells{' (extrapolated)' if cells is not None else ''}; K={K} "
          f"probes", flush=True)

    # warm-up: the first derivative calls pay one-off costs (torch.func imports, allocations)
    batched_jvp(bb, x, torch.randn(2, *x.shape).to(x), t, output="eps", chunk=args.chunk)
    batched_vjp(bb, x, torch.randn(2, 1, *bb.h_shape()).to(x), t, output="h", chunk=args.chunk)

    basis_secs: list[float] = []
    secs: dict[tuple[str, str], list[float]] = {}
    loop_secs: dict[str, list[float]] = {}
    fast_vals: dict[tuple[str, str], torch.Tensor] = {}
    loop_vals: dict[str, torch.Tensor] = {}
    basis: TangentBasis | None = None

    def fast(definition: str, estimator: str) -> None:
        def run():
            return rate_map(bb, x, t, definition, estimator, basis, t_prev, probes=K,
                            generator=torch.Generator().manual_seed(args.seed), k=args.k,
                            chunk=args.chunk)
        m, s = timed(run)
        secs.setdefault((definition, estimator), []).append(s)
        fast_vals[(definition, estimator)] = m.values.flatten()

    for rep in range(args.reps):
        basis, s = timed(lambda: tangent_basis(bb, x, t, k=args.k, oversample=args.oversample,
                                               max_iter=args.basis_max_iter, chunk=args.chunk))
        basis_secs.append(s)
        if rep == 0:
            print(f"basis: {s:.2f} s, {basis.iterations} passes, {basis.settings['jvps']} JVPs + "
                  f"{basis.settings['vjps']} VJPs, converged={basis.converged}, singular values "
                  f"{[round(float(v), 4) for v in basis.singular_values]}", flush=True)
        for definition in (*PROJECTED, "h"):
            estimators = ("gram",) if definition in PROJECTED else ("probe", "lowrank")
            for e in estimators:
                fast(definition, e)
            vals, s = timed(lambda d=definition, b=basis: loop_values(bb, x, t, d, b, t_prev,
                                                                      cells, args.chunk))
            loop_secs.setdefault(definition, []).append(s * n_cells / n_loop)
            loop_vals[definition] = vals
            for e in estimators:
                fast(definition, e)
            print(f"rep {rep}: {definition:6s} loop {s:.1f} s over {n_loop} cells; "
                  + ", ".join(f"{e} {statistics.median(secs[(definition, e)]):.3f} s"
                              for e in estimators), flush=True)

    basis_med = statistics.median(basis_secs)
    rows = []
    for (definition, estimator), ss in secs.items():
        med = statistics.median(ss)
        loop_med = statistics.median(loop_secs[definition])
        fv = fast_vals[(definition, estimator)]
        if cells is not None:
            fv = fv[cells]
        uses_basis = definition in PROJECTED or estimator == "lowrank"
        loop_e2e = loop_med + (basis_med if definition in PROJECTED else 0.0)
        fast_e2e = med + (basis_med if uses_basis else 0.0)
        rows.append(dict(
            definition=definition, estimator=estimator, seconds=med, seconds_all=ss,
            basis_seconds=basis_med if uses_basis else None,
            loop_seconds=loop_med, loop_seconds_all=loop_secs[definition],
            loop_extrapolated=cells is not None, ratio=loop_med / med,
            ratio_end_to_end=loop_e2e / fast_e2e,
            probes=K if estimator == "probe" else None,
            stated_relative_std=(1.0 / (2.0 * K)) ** 0.5 if estimator == "probe" else 0.0,
            errors=rel_errors(fv, loop_vals[definition]),
        ))
    return dict(model=name, description=bb.name or "default model", state=what,
                state_shape=list(bb.state_shape), h_shape=list(bb.h_shape()), t=t,
                t_prev=t_prev, cells=n_cells, loop_cells=n_loop, probes=K,
                basis=dict(seconds=basis_med, seconds_all=basis_secs,
                           passes=basis.iterations if basis else None,
                           jvps=basis.settings["jvps"] if basis else None,
                           vjps=basis.settings["vjps"] if basis else None,
                           converged=basis.converged if basis else None),
                rows=rows)


def print_table(results: list[dict[str, Any]]) -> None:
    hdr = (f"{'model':9s} {'definition':10s} {'estimator':9s} {'seconds':>8s} {'basis s':>8s} "
           f"{'loop s':>9s} {'ratio':>8s} {'e2e':>7s} {'max rel':>9s} {'p90 rel':>9s} "
           f"{'med rel':>9s}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for res in results:
        for r in res["rows"]:
            star = "*" if r["loop_extrapolated"] else " "
            b = "" if r["basis_seconds"] is None else f"{r['basis_seconds']:.2f}"
            e = r["errors"]
            print(f"{res['model']:9s} {r['definition']:10s} {r['estimator']:9s} "
                  f"{r['seconds']:8.3f} {b:>8s} {r['loop_seconds']:8.1f}{star} "
                  f"{r['ratio']:7.1f}x {r['ratio_end_to_end']:6.1f}x {e['max']:9.2e} "
                  f"{e['p90']:9.2e} {e['median']:9.2e}")
    print("seconds: the map given the basis (median); basis s: tangent_basis, timed separately; "
          "ratio = loop / map; e2e adds the basis wherever a side needs it; * loop time "
          "extrapolated linearly from a random subset of cells, errors on that subset.")
    for res in results:
        K = res["probes"]
        for r in res["rows"]:
            if r["estimator"] == "probe":
                print(f"{res['model']}: probe K={K} (stated per-cell relative std "
                      f"sqrt(1/(2K)) = {r['stated_relative_std']:.3f}); measured relative "
                      f"error std {r['errors']['std_signed']:.3f}, mean "
                      f"{r['errors']['mean_signed']:+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["default", "random64"],
                    choices=["default", "random64"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=1, help="repetitions (each: basis, then every "
                    "definition's estimators around its loop); medians are reported")
    ap.add_argument("--pixels-subset", type=int, default=None,
                    help="run the per-pixel loop on this many random cells and extrapolate its "
                    "time (default: full at 32x32, 512 at 64x64; 0: full everywhere)")
    ap.add_argument("--size", type=int, default=64, help="resolution of the random U-Net")
    ap.add_argument("--t", type=int, default=500, help="timestep of the state (on the grid)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps over the 1000 timesteps")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--oversample", type=int, default=4)
    ap.add_argument("--basis-max-iter", type=int, default=None,
                    help="cap on the tangent basis' power-iteration passes (default: its own)")
    ap.add_argument("--target-rel-std", type=float, default=0.1,
                    help="per-cell relative std the probe estimator is sized for")
    ap.add_argument("--probes", type=int, default=None,
                    help="probe count (default: from --target-rel-std)")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [measure(name, args) for name in args.models]
    print_table(results)
    print(f"total {time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} thread(s)")
    if args.json:
        report = dict(settings=vars(args), torch=torch.__version__,
                      threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M"),
                      results=results)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
