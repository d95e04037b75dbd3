"""RBE direction discovery: decoder-only Jacobian (cached skips) vs the full U-Net per product.

    OMP_NUM_THREADS=1 python benchmarks/rbe_discovery.py [--reps 3] [--passes 10] [--scene 0]

The authors' code differentiates ε(X_t, h) by running the whole U-Net for every JVP / VJP, with
h substituted into the mid block's output by a forward hook. The encoder does not depend on h, so
diffgeo runs it once (``Backbone.encode``) and differentiates only the decoder on the cached skip
tensors. Both compute the same function; this script measures what that saves for a full RBE
discovery (masked run J_M then unmasked run J_U, k = 3) on the embedded default model (32x32,
h = 128x8x8) at t = 500 of a 40-step DDIM inversion of a bundled held-out scene, with its object
mask as the region.

Two settings: (1) a fixed number of power passes (identical product counts, so the time ratio is
the per-product cost ratio); (2) the RBE defaults (tol 1e-4, at most 50 passes), which may stop
at different passes when round-off differs. Runs are interleaved round-robin over ``reps``
repetitions (medians reported), so the ratio comes from one run under the same load. Agreement:
the largest relative difference of the singular values and the largest principal angle between
the two implementations' direction subspaces.

Measured (CPU, one thread, sharing 2 cores with a training job; scene 0, mask 26% of the image,
3 reps): 10 fixed passes (120 products) 4.85 s decoder-only vs 5.67 s full U-Net, ratio 1.17;
defaults (29 + 40 passes, 420 products, the same in both) 16.6 s vs 19.1 s, ratio 1.15.
Singular values agree to 2e-7 (relative), subspaces to 1.5e-6 rad, one JVP to 7e-7: the same
function in float32. The saving is only the encoder's forward pass per product, so it is modest
here; JVP/VJP through the decoder dominate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import jvp, vjp

from diffgeo import sampling
from diffgeo.backbones import load_backbone
from diffgeo.backbones.pixel import PixelBackbone
from diffgeo.data import bundled_scenes
from diffgeo.editing.rbe import decoder_products, project_out, state_mask
from diffgeo.tangent import PowerIterationResult, block_power_iteration, principal_angles

Products = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def full_unet_products(bb: PixelBackbone, xt: torch.Tensor, t: int,
                       weight: torch.Tensor) -> Products:
    """J V and Jᵀ W the authors' way: the whole U-Net per call, h swapped in by a hook."""
    unet = bb.unet
    h0 = bb.h(xt, t).detach()
    slot: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return slot["h"]

    def f(H: torch.Tensor) -> torch.Tensor:
        b = H.shape[0]
        slot["h"] = H
        handle = unet.mid_block.register_forward_hook(hook)
        try:
            tt = bb.timesteps(t, b)
            out = unet(xt.repeat(b, 1, 1, 1), tt).sample
        finally:
            handle.remove()
        return bb.to_eps(out, xt.repeat(b, 1, 1, 1), tt)

    def apply_j(V: torch.Tensor) -> torch.Tensor:
        with bb.derivative_mode():
            _, jv = jvp(f, (h0.repeat(V.shape[0], 1, 1, 1),), (V.contiguous(),))
        return jv.detach() * weight

    def apply_jt(W: torch.Tensor) -> torch.Tensor:
        with bb.derivative_mode():
            _, pull = vjp(f, h0.repeat(W.shape[0], 1, 1, 1))
            (g,) = pull((W * weight).contiguous())
        return g.detach()

    return apply_j, apply_jt


def discovery(products_m: Products, products_u: Products, h_shape: tuple[int, ...],
              passes: int | None) -> tuple[PowerIterationResult, PowerIterationResult,
                                           torch.Tensor]:
    """J_M then J_U from one generator (seed 0), then Eq. 14 (leading projection)."""
    gen = torch.Generator().manual_seed(0)
    kw = dict(max_iter=50, tol=1e-4, power_passes=passes, generator=gen, space="h")
    rm = block_power_iteration(*products_m, h_shape, 3, **kw)  # type: ignore[arg-type]
    ru = block_power_iteration(*products_u, h_shape, 3, **kw)  # type: ignore[arg-type]
    v, _ = project_out(rm.vectors, ru.vectors[:1])
    return rm, ru, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--scene", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=str, default=None, help="write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bb = load_backbone("default")
    assert isinstance(bb, PixelBackbone)
    scene = bundled_scenes(32)[args.scene]
    image = torch.from_numpy(scene.composite).permute(2, 0, 1)[None] * 2 - 1
    mask = torch.from_numpy(scene.mask)
    t = 500
    xt = sampling.invert(bb, bb.to_state(image.to(bb.dtype)), t, 40).last
    ms = state_mask(bb, mask)
    with torch.no_grad():
        enc = bb.encode(xt, t)
    h_shape = tuple(enc.h.shape[1:])
    impls: dict[str, tuple[Products, Products]] = {
        "decoder_only": (decoder_products(bb, enc, ms), decoder_products(bb, enc, 1 - ms)),
        "full_unet_hook": (full_unet_products(bb, xt, t, ms),
                           full_unet_products(bb, xt, t, 1 - ms)),
    }
    # Same function? One JVP each on a random h-direction.
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(1, *h_shape, generator=g)
    a = impls["decoder_only"][0][0](probe)
    b = impls["full_unet_hook"][0][0](probe)
    jvp_rel = float((a - b).norm() / b.norm())

    report: dict = dict(model="default", h_shape=list(h_shape), t=t, num_steps=40, k=3,
                        scene=args.scene, mask_fraction=float(mask.mean()),
                        threads=torch.get_num_threads(), reps=args.reps, jvp_rel_diff=jvp_rel)
    for label, passes in (("fixed_passes", args.passes), ("defaults_tol_1e-4", None)):
        times: dict[str, list[float]] = {k: [] for k in impls}
        results: dict[str, tuple] = {}
        for rep in range(args.reps):
            order = list(impls) if rep % 2 == 0 else list(reversed(impls))
            for name in order:
                t0 = time.perf_counter()
                results[name] = discovery(*impls[name], h_shape, passes)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        (dm, du, dv), (fm, fu, fv) = results["decoder_only"], results["full_unet_hook"]
        entry = dict(
            passes=passes,
            seconds_median={k: round(v, 3) for k, v in med.items()},
            seconds_all={k: [round(x, 3) for x in v] for k, v in times.items()},
            time_ratio_full_over_decoder=round(med["full_unet_hook"] / med["decoder_only"], 3),
            iterations={"decoder_only": [dm.iterations, du.iterations],
                        "full_unet_hook": [fm.iterations, fu.iterations]},
            products={"decoder_only": dm.jvps + dm.vjps + du.jvps + du.vjps,
                      "full_unet_hook": fm.jvps + fm.vjps + fu.jvps + fu.vjps},
            singular_values={"masked": dm.singular_values.tolist(),
                             "unmasked": du.singular_values.tolist()},
            sv_max_rel_diff=float(max(
                ((dm.singular_values - fm.singular_values).abs() / fm.singular_values).max(),
                ((du.singular_values - fu.singular_values).abs() / fu.singular_values).max())),
            max_angle_masked_rad=float(principal_angles(dm.vectors, fm.vectors).max()),
            max_angle_projected_rad=float(principal_angles(dv, fv).max()),
        )
        report[label] = entry
        print(f"[{label}] median s: {entry['seconds_median']}  ratio full/decoder: "
              f"{entry['time_ratio_full_over_decoder']}  iterations: {entry['iterations']}  "
              f"sv rel diff: {entry['sv_max_rel_diff']:.2e}  angle: "
              f"{entry['max_angle_masked_rad']:.2e} rad", flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
