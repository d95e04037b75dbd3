"""Per transformer block of a flow-matching model (SD3/SD3.5, FLUX.1): the spectrum of D h and
how local a masked (RBE) direction is, for choosing the h block.

    python benchmarks/flow_blocks.py [--model PATH_OR_HUB_ID ...] [--device cuda]
        [--dtype float32] [--blocks all] [--t 250,500,750] [--k 4] [--steps 20] [--out DIR]

Without ``--model`` it runs on the tiny randomly initialised SD3 and FLUX pipelines the tests
build (``tests/flow_models.py``, written to a temporary folder): the numbers then only show the
script works. With real weights (a folder or a hub id, through ``load_backbone``) and a GPU it
measures what the default h block (n/2 − 1) is chosen by.

For each model the image (``--image``, default bundled held-out scene 0, fitted to the model's
size) is encoded and inverted on a ``--steps`` flow grid up to the largest ``--t``; at the state
X_t of each level t nearest a requested model time, and for each block b taken as h:

- **spectrum**: the top-k singular values of J = D h_b(X_t) (h_b = block b's image tokens, w.r.t.
  the state) by block power iteration (``diffgeo.tangent.tangent_basis``, output "h"), with
  whether the residual test passed;
- **locality** of the leading RBE direction v of the region (``--box`` in image pixels, default
  the centre half; or ``--mask``), found by ``diffgeo.editing.rbe.directions_at`` at the same
  state (Eq. 14 projection against the leading unmasked vector): the share of a change's energy
  that lies inside the region's tokens, Σ w·d² / Σ d², with w the token-grid region (each token
  the fraction of its pixels in the region, ``token_region``) spread over the cells or pixels the
  token covers. ``out``: d = (∂ε/∂h) v, the first-order change of the model output (ε and x̂0
  are both multiples of the velocity at fixed X_t, so this is also x̂0's); ``x0``: d = the edited
  image minus the unedited reconstruction after a whole asymmetric edit from t to 0
  (``apply_direction``, strength ``--strength`` × ‖h‖, the x̂0-only edit). ``region``: the
  region's own share Σ w / N, what a direction indifferent to the region would score.

Writes ``flow_blocks.json`` (every number, the settings, device, dtype, date, models) and
``flow_blocks.md`` (the README table) in ``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ("tiny-sd3", "tiny-flux")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None,
                    help="model folder or hub id (repeatable; default: the tiny SD3 and FLUX)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 or float64")
    ap.add_argument("--resolution", type=int, default=None,
                    help="image size to run a real model at (default: its own)")
    ap.add_argument("--prompt", default="", help="prompt the model is conditioned on")
    ap.add_argument("--image", type=Path, default=None,
                    help="image file (default: bundled held-out scene 0)")
    ap.add_argument("--mask", type=Path, default=None,
                    help="region mask file, drawn on the fitted image (instead of --box)")
    ap.add_argument("--box", type=str, default=None,
                    help="region x0,y0,x1,y1 in model-image pixels (default: the centre half)")
    ap.add_argument("--blocks", default="all", help="'all' or comma-separated block indices")
    ap.add_argument("--t", type=floats, default=[250.0, 500.0, 750.0],
                    help="model times sigma*T; each is taken to the nearest grid level below T")
    ap.add_argument("--steps", type=int, default=20, help="flow grid steps (the inversion's)")
    ap.add_argument("--k", type=int, default=4, help="singular values of D h per block")
    ap.add_argument("--oversample", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--directions", type=int, default=2,
                    help="RBE directions found per region (the leading one is measured)")
    ap.add_argument("--strength", type=float, default=0.05,
                    help="edit strength for the x0 locality, as a fraction of ||h||")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path("flow_blocks"))
    args = ap.parse_args(argv)
    if not args.t or not all(math.isfinite(t) and t >= 0 for t in args.t):
        ap.error(f"--t must be model times >= 0, got {args.t}")
    for name in ("steps", "k", "max_iter", "directions"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.oversample < 0 or not args.tol > 0 or not args.strength > 0:
        ap.error("--oversample must be >= 0, --tol and --strength > 0")
    if args.mask is not None and args.box is not None:
        ap.error("give --mask or --box, not both")
    return args


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return (f"{device} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)")


def write_tiny_models(root: Path) -> dict[str, Path]:
    """The tests' tiny SD3 (3 blocks) and FLUX (1 double- + 2 single-stream blocks)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from flow_models import write_flux, write_sd3  # noqa: PLC0415 (test helpers, tiny runs only)

    return {"tiny-sd3": write_sd3(root / "tiny-sd3", t5=False, num_layers=3),
            "tiny-flux": write_flux(root / "tiny-flux")}


def input_image(bb: Any, path: Path | None) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] at the model's image size."""
    from diffgeo.io import load_image
    from diffgeo.io.images import fit_tensor

    if path is not None:
        return load_image(path, size=bb.image_size, fit="crop")[0]
    from diffgeo.data import bundled_scenes

    scene = bundled_scenes()[0]
    x = torch.from_numpy(scene.composite).permute(2, 0, 1)[None].float() * 2 - 1
    return fit_tensor(x, bb.image_size, "resize")[0]


def region(bb: Any, args: argparse.Namespace) -> torch.Tensor:
    """The region (H, W) on the model's image."""
    from diffgeo.io.regions import as_mask, box_mask, load_mask, parse_box

    H, W = bb.image_size
    if args.mask is not None:
        return as_mask(load_mask(args.mask, bb.image_size, "crop"), bb.image_size, "--mask")
    box = (parse_box(args.box) if args.box is not None
           else (W // 4, H // 4, W - W // 4, H - H // 4))
    return box_mask(box, bb.image_size)


def token_weight(bb: Any, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The region's tokens (area rule) spread over a (size) grid of cells or pixels."""
    from diffgeo.io.regions import cells_to_image

    w = bb.token_region(mask).reshape(bb.token_grid).to(torch.float64)
    return cells_to_image(w, size).to(torch.float64)


def inside_share(delta: torch.Tensor, weight: torch.Tensor) -> float:
    """Σ w·d² / Σ d² over every channel: the share of the change's energy in the region."""
    e = delta.detach().to(torch.float64).square().sum(dim=tuple(range(delta.ndim - 2)))
    total = float(e.sum())
    return float((weight.to(e) * e).sum()) / total if total > 0 else math.nan


def measure_block(bb: Any, x0: torch.Tensor, xt: torch.Tensor, t: float, grid: Any, cond: Any,
                  mask: torch.Tensor, w_state: torch.Tensor, w_image: torch.Tensor,
                  args: argparse.Namespace) -> dict[str, Any]:
    from diffgeo.editing.rbe import RBEConfig, apply_direction, decoder_products, directions_at
    from diffgeo.tangent import PowerIterationConfig, tangent_basis

    power = dict(k=args.k, oversample=args.oversample, tol=args.tol, max_iter=args.max_iter)
    t0 = time.perf_counter()
    basis = tangent_basis(bb, xt, t, cond, output="h", config=PowerIterationConfig(**power),
                          generator=torch.Generator().manual_seed(args.seed))
    t1 = time.perf_counter()
    rbe = RBEConfig(**{**power, "k": args.directions})
    d = directions_at(bb, xt, t, mask, rbe, cond=cond,
                      generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        enc = bb.encode(xt, t, cond)
    apply_j, _ = decoder_products(bb, enc)
    lead = d.vectors[:1].to(enc.h)
    out_share = inside_share(apply_j(lead)[0], w_state)
    raw_share = inside_share(apply_j(d.raw_vectors[:1].to(enc.h))[0], w_state)
    t2 = time.perf_counter()
    alpha = args.strength * float(enc.h.double().norm())
    edit = apply_direction(bb, x0, d, 0, (alpha,), grid=grid, cond=cond)
    x0_share = inside_share(edit.images[0] - edit.reconstruction[0], w_image)
    t3 = time.perf_counter()
    return dict(
        block=bb.h_block, block_name=bb.describe_h_block(), t=t, sigma=grid.sigma(t),
        singular_values=basis.singular_values.tolist(), converged=basis.converged,
        error_bound=basis.error_bound, iterations=basis.iterations,
        direction_singular_values=d.singular_values.tolist(),
        directions_converged=d.converged,
        locality_out=out_share, locality_out_raw=raw_share, locality_x0=x0_share,
        strength=alpha, seconds=dict(spectrum=t1 - t0, directions=t2 - t1, edit=t3 - t2),
    )


def measure_model(spec: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    from diffgeo.backbones import load_backbone
    from diffgeo.backbones.flow import FlowBackbone
    from diffgeo.errors import InputError
    from diffgeo.sampling import Grid, invert

    bb = load_backbone(spec, device=args.device, dtype=args.dtype, resolution=args.resolution)
    if not isinstance(bb, FlowBackbone):
        raise InputError(f"--model {spec} is a {bb.kind} model: this benchmark is for "
                         "flow-matching transformers (SD3, FLUX)")
    blocks = list(range(bb.num_blocks)) if args.blocks == "all" else ints(args.blocks)
    for b in blocks:
        bb.h_block = b  # validates the index before any work
    grid = Grid.for_model(bb, args.steps)
    below = [s for s in grid.timesteps if s < bb.num_train_timesteps]  # an edit needs σ < 1
    levels = sorted({min(below, key=lambda s, t=t: abs(s - t)) for t in args.t})
    image = input_image(bb, args.image).to(device=bb.device, dtype=bb.dtype)
    mask = region(bb, args)
    cond = bb.condition(args.prompt)
    with torch.no_grad():
        x0 = bb.to_state(image)
        path = invert(bb, x0, levels[-1], grid, cond)
    w_state = token_weight(bb, mask, bb.state_shape[-2:]).to(bb.device)
    w_image = token_weight(bb, mask, bb.image_size).to(bb.device)
    rows = []
    for b in blocks:
        bb.h_block = b
        for t in levels:
            row = measure_block(bb, x0, path.at(t), t, grid, cond, mask, w_state, w_image, args)
            rows.append(row)
            print(f"{name} block {b} t={t:.1f}: sv {fmt_values(row['singular_values'])}, "
                  f"inside out {row['locality_out']:.3f} x0 {row['locality_x0']:.3f}",
                  flush=True)
    return dict(model=name, kind=bb.summary().kind, family=bb.family,
                num_blocks=bb.num_blocks, default_h_block=bb.default_h_block,
                token_grid=list(bb.token_grid), image_size=list(bb.image_size),
                h_shape=list(bb.h_shape()), region_share=float(w_image.mean()),
                levels=levels, rows=rows)


def fmt_values(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def markdown(report: dict[str, Any]) -> str:
    k = report["settings"]["k"]
    lines = [f"Spectrum of D h and locality of the leading RBE direction per block "
             f"({report['device']}, {report['dtype']}, {report['date']}; grid "
             f"{report['settings']['steps']} steps). σ: top-{k} singular values of D h (* = "
             "power iteration not converged); inside: share of the change's energy in the "
             "region's tokens, of the output (∂ε/∂h·v) and of the edited x̂0; region: the "
             "region's share (chance).", "",
             "| model | block | τ (σ) | σ(D h) | σ₁/σ_k | inside (out) | inside (x̂0) | region |",
             "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for r in m["rows"]:
            sv = r["singular_values"]
            ratio = sv[0] / sv[-1] if sv[-1] > 0 else math.inf
            mark = "" if r["converged"] else "*"
            default = " (default)" if r["block"] == m["default_h_block"] else ""
            lines.append(f"| {m['model']} | {r['block_name']}{default} | {r['t']:.0f} "
                         f"({r['sigma']:.2f}) | {fmt_values(sv)}{mark} | {ratio:.3g} | "
                         f"{r['locality_out']:.3f} | {r['locality_x0']:.3f} | "
                         f"{m['region_share']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from diffgeo.errors import DiffgeoError

    args = parse_args(argv)
    try:
        run(args)
    except DiffgeoError as e:  # bad input: one line, no traceback
        sys.exit(f"flow_blocks.py: error: {e}")


def run(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from diffgeo.runtime import resolve_dtype

    dtype = str(resolve_dtype(args.dtype)).replace("torch.", "")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        specs = ({n: str(n) for n in args.model} if args.model
                 else {n: str(p) for n, p in write_tiny_models(Path(tmp)).items()})
        if args.threads is not None:  # the test helpers pin one thread; the flag decides
            torch.set_num_threads(args.threads)
        models = [measure_model(spec, name, args) for name, spec in specs.items()]
    report = dict(
        benchmark="flow_blocks", date=datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%d %H:%M UTC"),
        device=device_description(args.device), dtype=dtype, torch=torch.__version__,
        models=models, seconds=time.perf_counter() - start,
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flow_blocks.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "flow_blocks.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'flow_blocks.json'} and {args.out / 'flow_blocks.md'} "
          f"({report['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
