"""Cost of JVPs and VJPs of ε and h relative to a plain forward pass, per backbone kind.

    python benchmarks/jacobian_cost.py [--threads 1] [--reps 7] [--device cpu]
        [--sd small|sd15|sd21]

Models: the embedded default pixel model (32x32), and a randomly initialised
Stable-Diffusion-shaped U-Net (``benchmarks/random_sd.py``; ``small`` runs on a CPU,
``sd15``/``sd21`` want a GPU). All timings of one model are interleaved round-robin over ``reps``
repetitions and reported as medians, so the ratios come from one run under the same load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from random_sd import KINDS, sd_backbone

from diffgeo import jacobian as J
from diffgeo.backbones import load_backbone


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_seconds(bb, device: str, reps: int = 1) -> float:
    """Median seconds of one batch-1, no-grad ε forward at timestep 500 (after a warm-up): the
    unit the benchmarks express other costs in."""
    x = torch.randn(1, *bb.state_shape, generator=torch.Generator().manual_seed(0))
    x = x.to(bb.device, bb.dtype)
    times = []
    with torch.no_grad():
        bb.eps(x, 500)
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            bb.eps(x, 500)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(bb, device: str, reps: int, k: int) -> dict:
    """Median seconds of each product and its multiple of a plain forward pass, in the
    backbone's dtype (its states and directions are drawn in it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *bb.state_shape, generator=g).to(device, bb.dtype)
    v = torch.randn(x.shape, generator=g).to(x)
    with torch.no_grad():
        e = bb.eps(x, 500)
        h = bb.h(x, 500)
    ue = torch.randn(e.shape, generator=g).to(e)
    uh = torch.randn(h.shape, generator=g).to(h)
    V = torch.randn(k, *x.shape, generator=g).to(x)

    def fwd():
        with torch.no_grad():
            bb.eps(x, 500)

    def fwd_deriv_mode():
        with torch.no_grad(), bb.derivative_mode():
            bb.eps(x, 500)

    def enc_only():
        with torch.no_grad():
            bb.h(x, 500)

    ops = {
        "forward eps (fast kernels)": fwd,
        "forward eps (derivative mode)": fwd_deriv_mode,
        "forward h (encoder only)": enc_only,
        "jvp eps": lambda: J.jvp(bb, x, v, 500),
        "vjp eps": lambda: J.vjp(bb, x, ue, 500),
        "jvp h": lambda: J.jvp(bb, x, v, 500, output="h"),
        "vjp h": lambda: J.vjp(bb, x, uh, 500, output="h"),
        f"batched jvp eps, per direction (K={k})": lambda: J.batched_jvp(bb, x, V, 500, chunk=k),
    }
    for fn in ops.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(reps):
        for name, fn in ops.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med[f"batched jvp eps, per direction (K={k})"] /= k
    base = med["forward eps (fast kernels)"]
    return {name: {"seconds": s, "x_forward": s / base} for name, s in med.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sd", default="small", choices=KINDS)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"device": args.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    for label, bb in (("pixel (default model, 32x32)", load_backbone("default",
                                                                      device=args.device)),
                      (f"latent (SD-shaped, {args.sd})", sd_backbone(args.sd, args.device))):
        res = measure(bb, args.device, args.reps, args.k)
        report[label] = res
        print(f"\n{label}: state {bb.state_shape}, h {bb.h_shape()}")
        for name, r in res.items():
            print(f"  {name:42s} {r['seconds'] * 1e3:9.2f} ms  {r['x_forward']:6.2f}x forward")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
