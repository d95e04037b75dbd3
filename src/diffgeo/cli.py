"""``diffgeo`` command line: every verb reads the same way (DESIGN.md §2b).

    diffgeo VERB INPUT... --model M --out DIR [--device] [--dtype] [--seed] [--steps] [--fit]

Each verb writes its results into ``--out`` (PNG, ``settings.json`` with everything needed to
reproduce it, and data as NPZ/CSV) and refuses to overwrite files unless ``--force`` is given.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from diffgeo.errors import DiffgeoError

app = typer.Typer(
    name="diffgeo",
    help="The geometry of pretrained diffusion models as tools: generation curves, "
    "region-based h-space editing and progressive exemplar editing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = ("Model: 'default' (the small model shipped with diffgeo), a local folder saved with "
              "save_pretrained, or a Hugging Face Hub id such as google/ddpm-ema-celebahq-256.")
DEVICE_HELP = "Device to run on: cpu, cuda, cuda:1, mps."
DTYPE_HELP = ("Weights dtype: float32 (default), float64 (reference derivatives), float16/bfloat16 "
              "(GPU, forward passes only).")
FIT_HELP = ("How to bring an image of another size to the model's: crop (scale the short side, "
            "centre-crop), pad (scale the long side, pad with grey) or resize (distorts the "
            "aspect). Without it, a size mismatch is an error.")
FORCE_HELP = "Overwrite files that already exist in --out."
SEED_HELP = "Seed of every random draw (same seed, same output)."


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes print one line and exit 2; genuine bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DiffgeoError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


def _load(model: str, device: str, dtype: str, allow_pickle: bool = False):
    from diffgeo.backbones import load_backbone

    return load_backbone(model, device=device, dtype=dtype, allow_pickle=allow_pickle)


@app.command()
@friendly_errors
def info(
    model: str = typer.Argument("default", help=MODEL_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    allow_pickle: bool = typer.Option(False, help="Allow loading pickle (.bin) weights."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Load a model and print what diffgeo sees: kind, sizes, bottleneck shape, schedule."""
    bb = _load(model, device, dtype, allow_pickle)
    s = bb.summary()
    if as_json:
        typer.echo(json.dumps(s.__dict__, indent=2, default=list))
    else:
        for line in s.lines():
            typer.echo(line)


@app.command()
@friendly_errors
def invert(
    image: Path = typer.Argument(..., help="Image to invert (PNG, JPEG, WebP)."),
    model: str = typer.Option("default", help=MODEL_HELP),
    t: int = typer.Option(700, "--t", help="Timestep to invert to (on the DDIM grid)."),
    steps: int = typer.Option(50, help="DDIM steps over the full 0..T-1 range (the grid)."),
    exact: bool = typer.Option(False, help="Refine every inversion step by fixed-point "
                               "iteration so that generation maps it back exactly."),
    tol: float = typer.Option(1e-5, help="Exact mode: relative round-trip tolerance per step."),
    max_iter: int = typer.Option(50, help="Exact mode: iteration cap per step."),
    prompt: str = typer.Option("", help="Text prompt (conditional models; empty by default)."),
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/invert"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP),
    force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """DDIM-invert IMAGE to X_t, regenerate it, and save the trajectory, the reconstruction and
    its PSNR."""
    from diffgeo.runs import invert_image

    res = invert_image(image, model=model, t=t, num_steps=steps, exact=exact, tol=tol,
                       max_iter=max_iter, prompt=prompt, fit=fit, out=out, device=device,
                       dtype=dtype, seed=seed, force=force, progress=True)
    typer.echo(f"reconstruction PSNR: {res['psnr']:.2f} dB  (state round trip max error "
               f"{res['state_max_error']:.2e})")
    typer.echo(f"wrote {out}/")


@app.command()
@friendly_errors
def curves(
    image: Path = typer.Argument(..., help="Image whose generation curves to trace."),
    pixel: list[str] = typer.Option([], "--pixel", help="A pixel R,C in input-image pixels "
                                    "(row, column); repeatable."),
    mask: Path | None = typer.Option(None, help="A region (mask image, white = region): one "
                                     "curve, the average of its pixels' rates (Eq. 7)."),
    box: str | None = typer.Option(None, help="A rectangular region r0,c0,r1,c1 (end "
                                   "exclusive), in input-image pixels."),
    row: list[int] = typer.Option([], "--row", help="A whole image row (average); repeatable."),
    col: list[int] = typer.Option([], "--col", help="A whole image column; repeatable."),
    definition: str = typer.Option("h", help="exact (‖Df⁻¹[Proj v]‖, Eq. 6/8), eps "
                                   "(‖Dε[Proj v]‖), h-proj (‖Dh[Proj v]‖), h (‖Dh[v]‖, the "
                                   "differentiable one), or all (the four, Fig. 5)."),
    model: str = typer.Option("default", help=MODEL_HELP),
    t: int | None = typer.Option(None, "--t", help="Top of the path (default: the top of "
                                 "the DDIM grid)."),
    steps: int = typer.Option(50, help="DDIM steps over the full 0..T-1 range (the grid)."),
    k: int = typer.Option(3, help="Tangent-space dimension for the projected definitions."),
    channel: int | None = typer.Option(None, help="One state channel instead of all."),
    window: int = typer.Option(5, help="Fluctuation: sliding-window length."),
    t_min: int = typer.Option(200, help="Fluctuation: only timesteps above this."),
    prompt: str = typer.Option("", help="Text prompt (conditional models)."),
    perceptual: str | None = typer.Option(None, help="Also the region's perceptual-based curve "
                                          "(App. C.2) with this DINO model (hub id or folder, "
                                          "e.g. facebook/dino-vits16); needs --mask or --box."),
    perceptual_mode: str = typer.Option("multiply", help="DINO masking: multiply (the paper's "
                                        "I⊙M) or crop (also crop to the region's box)."),
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/curves"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP),
    force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Generation curves of pixels, regions, rows or columns along IMAGE's DDIM inversion path,
    with their fluctuation (the saliency statistic); writes curves.png/.csv/.npz."""
    from diffgeo.io import parse_box, parse_point
    from diffgeo.runs import curves_for_image

    res = curves_for_image(
        image, model=model, pixels=[parse_point(p, "--pixel") for p in pixel], mask=mask,
        box=parse_box(box) if box else None, rows=row, cols=col, definition=definition, t=t,
        num_steps=steps, k=k, channel=channel, window=window, t_min=t_min, prompt=prompt,
        perceptual=perceptual, perceptual_mode=perceptual_mode, fit=fit, out=out, device=device,
        dtype=dtype, seed=seed, force=force, progress=True)
    for d, per in res["fluctuation"].items():
        for label, f in per.items():
            typer.echo(f"{d:7s} {label:24s} fluctuation {f:.4g}")
    typer.echo(f"wrote {out}/")


@app.command("saliency-map")
@friendly_errors
def saliency_map_cmd(
    image: Path = typer.Argument(..., help="Image to map."),
    definition: str = typer.Option("h", help="Rate definition: h (default), h-proj, eps, exact."),
    estimator: str | None = typer.Option(None, help="probe (Gaussian-probe column norms, for h), "
                                         "lowrank (h), gram (projected definitions) or loop "
                                         "(one JVP per pixel, the slow reference)."),
    probes: int = typer.Option(64, help="Probe estimator: number of probes K (per-pixel "
                               "relative std of the rate ≈ sqrt(1/(2K)))."),
    model: str = typer.Option("default", help=MODEL_HELP),
    t: int | None = typer.Option(None, "--t", help="Top of the path (default: top of grid)."),
    steps: int = typer.Option(50, help="DDIM steps over the full 0..T-1 range (the grid)."),
    k: int = typer.Option(3, help="Tangent-space dimension (projected definitions, lowrank)."),
    window: int = typer.Option(5, help="Fluctuation: sliding-window length."),
    t_min: int = typer.Option(200, help="Fluctuation: only timesteps above this."),
    prompt: str = typer.Option("", help="Text prompt (conditional models)."),
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/saliency"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP),
    force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Whole-image generation-rate maps along IMAGE's inversion path and the saliency map (the
    fluctuation of every pixel's curve), with an overlay; writes saliency.png, rate_maps.npz."""
    from diffgeo.runs import saliency_for_image

    res = saliency_for_image(
        image, model=model, definition=definition, estimator=estimator, probes=probes, t=t,
        num_steps=steps, k=k, window=window, t_min=t_min, prompt=prompt, fit=fit, out=out,
        device=device, dtype=dtype, seed=seed, force=force, progress=True)
    typer.echo(f"estimator {res['estimator']} (per-pixel relative std "
               f"{res['relative_std_per_cell']:.3f}); wrote {out}/")


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals:
        from diffgeo.errors import InputError

        raise InputError(f"{name} must be comma-separated numbers like -30,0,30, got {text!r}")
    return vals


@app.command()
@friendly_errors
def directions(
    image: Path = typer.Argument(..., help="Image whose region to find directions for."),
    mask: Path | None = typer.Option(None, help="Region mask image (white = region)."),
    box: str | None = typer.Option(None, help="Rectangular region r0,c0,r1,c1 (end exclusive), "
                                   "in input-image pixels."),
    t: int = typer.Option(500, "--t", help="Discovery timestep (on the DDIM grid)."),
    steps: int = typer.Option(40, help="DDIM steps over the full 0..T-1 range (the grid)."),
    k: int = typer.Option(3, help="Number of directions."),
    project: str = typer.Option("leading", help="Eq. 14 projection against the unmasked "
                                "region: leading (the paper), subspace (its top-k), none."),
    preview: str = typer.Option("-30,0,30", help="Strengths of the preview strip per "
                                "direction."),
    model: str = typer.Option("default", help=MODEL_HELP),
    prompt: str = typer.Option("", help="Text prompt (conditional models)."),
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/directions"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP),
    force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Region-based editing: unsupervised h-space directions that change a masked region (power
    iteration on the masked Jacobian, projected against the rest); saves them and a preview
    strip per direction."""
    from diffgeo.io import parse_box
    from diffgeo.runs import directions_for_image

    res = directions_for_image(
        image, model=model, mask=mask, box=parse_box(box) if box else None, t=t,
        num_steps=steps, k=k, project=project, preview=_floats(preview, "--preview"),
        prompt=prompt, fit=fit, out=out, device=device, dtype=dtype, seed=seed, force=force,
        progress=True)
    typer.echo("singular values: " + ", ".join(f"{v:.4g}" for v in res["singular_values"]))
    typer.echo(f"wrote {out}/ (use --directions {out}/directions)")


@app.command()
@friendly_errors
def apply(
    image: Path = typer.Argument(..., help="Image to edit."),
    directions_dir: Path = typer.Option(..., "--directions", help="A directions folder written "
                                        "by `diffgeo directions` (DIR/directions)."),
    index: int = typer.Option(0, help="Which direction."),
    strength: str = typer.Option("-30,0,30", help="Edit strengths α, comma-separated."),
    mode: str = typer.Option("x0", help="x0: inject into the x̂0-prediction term only "
                             "(Asyrp, as the paper states); replace: edited ε in both terms "
                             "(the authors' released code)."),
    window: str | None = typer.Option(None, help="Edited timesteps t_low,t_high (default: from "
                                      "the discovery timestep down to 0)."),
    eta: float = typer.Option(0.0, help="Stochastic DDIM below the window (needs --seed)."),
    mask: Path | None = typer.Option(None, help="Region for the inside/outside change report "
                                     "(default: the discovery mask)."),
    rediscover: bool = typer.Option(False, help="Re-find the directions at every edited step "
                                    "(on the unedited path) and follow the chosen one."),
    model: str = typer.Option("default", help=MODEL_HELP),
    prompt: str = typer.Option("", help="Text prompt (conditional models)."),
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/apply"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP),
    force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Edit IMAGE along a discovered h-space direction at several strengths; writes a strip
    and the change inside vs outside the region."""
    from diffgeo.runs import apply_for_image

    win = None
    if window is not None:
        w = _floats(window, "--window")
        if len(w) != 2:
            from diffgeo.errors import InputError

            raise InputError(f"--window must be t_low,t_high, got {window!r}")
        win = (int(w[0]), int(w[1]))
    res = apply_for_image(image, directions=directions_dir, model=model, index=index,
                          strengths=_floats(strength, "--strength"), mode=mode, window=win,
                          eta=eta, mask=mask, rediscover=rediscover, prompt=prompt, fit=fit,
                          out=out, device=device,
                          dtype=dtype, seed=seed, force=force, progress=True)
    for loc in res.get("locality", []):
        typer.echo(f"α={loc['strength']:+g}: MSE inside {loc['mse_inside']:.3g}, outside "
                   f"{loc['mse_outside']:.3g}")
    typer.echo(f"wrote {out}/")


@app.command()
@friendly_errors
def exemplar(
    source: Path = typer.Argument(..., help="Source image to edit."),
    exemplars: list[Path] = typer.Option([], "--exemplar", help="Exemplar image (repeatable; "
                                          "fitted like the source unless --place is given)."),
    maps: list[Path] = typer.Option([], "--map", help="Edit map for the exemplar of the same "
                                    "position (repeatable), drawn on the source: white/1 = keep "
                                    "the source, black/0 = take the exemplar, grey in between."),
    strength: float = typer.Option(0.8, help="Maximum denoising strength t_ds^max in (0, 1]: as in "
                                   "diffusers' img2img, int(steps·strength) steps are run."),
    steps: int = typer.Option(50, help="DDIM steps over the full 0..T-1 range (the grid)."),
    threshold: str = typer.Option("linear", help="Threshold over the executed steps: linear, "
                                  "quadratic, cubic, log1p or sigmoid."),
    prompt: str = typer.Option("", help="Text prompt (conditional models; empty by default)."),
    guidance_scale: float = typer.Option(1.0, help="Classifier-free guidance scale "
                                         "(conditional models; 1 = off)."),
    invert_maps: bool = typer.Option(False, help="Maps use the opposite polarity "
                                     "(1 = take the exemplar)."),
    iterative: bool = typer.Option(False, help="One exemplar per pass, feeding each output "
                                   "back as the next source (default: all in one pass; where "
                                   "maps overlap the last exemplar wins)."),
    place: list[str] = typer.Option([], "--place", help="row,col[,scale]: paste the exemplar "
                                    "of the same position (native size, scaled by scale) with its "
                                    "top-left corner at this model pixel of the fitted source "
                                    "(give once per --exemplar)."),
    model: str = typer.Option("default", help=MODEL_HELP),
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/exemplar"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP),
    force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """PIXELS: progressive exemplar editing of SOURCE with --exemplar/--map pairs; writes the
    result, the maps as used and the per-step mask strip."""
    from diffgeo.runs import exemplar_edit

    res = exemplar_edit(source, exemplars=exemplars, maps=maps, model=model, strength=strength,
                        num_steps=steps, threshold=threshold, prompt=prompt,
                        guidance_scale=guidance_scale, invert_maps=invert_maps,
                        iterative=iterative, placements=place, fit=fit, out=out,
                        device=device, dtype=dtype, seed=seed, force=force, progress=True)
    typer.echo(f"edited from t={res['t_start']} over {len(res['executed_timesteps'])} steps "
               f"({len(exemplars)} exemplar(s), threshold {threshold})")
    typer.echo(f"wrote {out}/")


@app.command()
@friendly_errors
def batch(
    jobs: Path = typer.Argument(..., help="JSON-lines jobs file: one object per line with "
                                "\"task\" (invert, curves, saliency-map, directions, apply, "
                                "exemplar), optional \"id\", and the task's arguments by their "
                                "Python names (e.g. num_steps, pixels)."),
    out: Path = typer.Option(Path("out/batch"), help="Output folder: one sub-folder per job, "
                             "records/ with one record per job."),
    device: str | None = typer.Option(None, help="Device for jobs that name none (default: "
                                      "the process's accelerate device, else cpu)."),
) -> None:
    """Run many jobs, skipping those already complete (resumable); under `accelerate launch`
    the jobs are split across the processes. A failing job is recorded and the rest go on."""
    from diffgeo.batch import current_shard, run_batch

    shard = current_shard()
    summary = run_batch(jobs, out, shard=shard, device=device,
                        on_record=lambda r: typer.echo(_record_line(r)))
    prefix = f"[{shard.process_index}/{shard.num_processes}] " if shard.num_processes > 1 else ""
    typer.echo(f"{prefix}{summary.line()}; records in {out}/records/")
    if summary.count("failed") and shard.num_processes == 1:
        raise typer.Exit(1)


def _record_line(rec: dict[str, Any]) -> str:
    msg = f"{rec['id']}: {rec['status']} ({rec['seconds']:.1f} s)"
    return msg + (f" - {rec['error']}" if rec["error"] else "")


@app.command()
@friendly_errors
def evaluate(
    results: Path = typer.Argument(..., help="A `diffgeo batch` output folder."),
    metric: list[str] = typer.Option([], "--metric", help="psnr, ssim or mse (repeatable; "
                                     "default: all three)."),
    clip: str | None = typer.Option(None, help="Also CLIP_sim (and CLIP-I for exemplar jobs) "
                                    "with this CLIP model (hub id or folder)."),
    dino: str | None = typer.Option(None, help="Also DINO_sim per pair and fd_dino per task "
                                    "(Fréchet distance of DINO features, inputs vs results) "
                                    "with this DINO model (hub id or folder)."),
    lpips: bool = typer.Option(True, help="LPIPS per pair when the lpips package and its "
                               "AlexNet weights are already here (never downloaded)."),
    fid: bool = typer.Option(True, help="FID per task when pytorch_fid and its Inception "
                             "weights are already here (never downloaded)."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    force: bool = typer.Option(False, help="Overwrite evaluation.csv / evaluation.json."),
) -> None:
    """Metrics over a batch's finished jobs (invert, exemplar, apply, ...): a table per task of
    mean ± std and N, also written as RESULTS/evaluation.csv and evaluation.json. Set metrics
    (fd_dino, fid) are one value per task over its N pairs, with std nan. A metric that cannot
    run here gets a `note:` line saying why."""
    from diffgeo.evaluate import METRICS, evaluate_results, format_table

    table = evaluate_results(results, metric or METRICS, clip=clip, dino=dino, device=device,
                             force=force, lpips=lpips, fid=fid)
    typer.echo(format_table(table))
    typer.echo(f"wrote {results}/evaluation.csv and evaluation.json")


def _curve_task(task: str, image: Path, mask: Path | None, box: str | None,
                reference: str | None, direction: str, common: dict) -> None:
    from diffgeo.io import parse_box, parse_point
    from diffgeo.runs import curve_edit

    res = curve_edit(task, image, mask=mask, box=parse_box(box) if box else None,
                     reference=parse_point(reference, "--reference") if reference else None,
                     direction=direction, progress=True, **common)
    typer.echo(f"final loss {res['final_loss']:.4g} (mean of the last 10: "
               f"{res['mean_loss_last_10']:.4g}); wrote {common['out']}/")


#: Parameters every curve verb shares and passes on to runs.curve_edit under the same name.
_CURVE_SHARED = ("model", "prompt", "iterations", "t", "lr", "mode", "pixels_per_iteration",
                 "match_outside_stats", "refresh_every", "refresh_drift", "blend_every",
                 "lambda1", "feature_weight", "snapshot_every", "decode_blend", "t_blend", "fit",
                 "out", "device", "dtype", "seed", "force")


def _curve_options(params: dict) -> dict:
    """runs.curve_edit's settings from a curve verb's parameters (its ``locals()``): one
    mapping instead of a 24-argument positional call repeated per verb."""
    return {**{name: params[name] for name in _CURVE_SHARED},
            "num_steps": params["steps"], "localized": not params["no_localized"]}


_REGION_MASK = typer.Option(None, "--mask", help="Region mask image (white = region).")
_REGION_BOX = typer.Option(None, "--box", help="Rectangular region r0,c0,r1,c1 (end exclusive).")
_ITER = typer.Option(None, help="Adam iterations (default: 300; 70 saliency; 100 blend).")
_T = typer.Option(700, "--t", help="Timestep of the optimised X_t (on the DDIM grid).")
_STEPS = typer.Option(50, help="DDIM steps over the full 0..T-1 range (the grid).")
_LR = typer.Option(0.02, help="Adam learning rate.")
_MODE = typer.Option("fast", help="fast: reuse the path's ΔX between refreshes; faithful: "
                     "re-integrate X_t → X_tk every iteration (the paper).")
_PIXELS = typer.Option(None, "--pixels-per-iteration", help="(pixel, timestep) pairs per "
                       "iteration, one batched JVP (default: 4 in fast mode, 1 in faithful "
                       "mode as the paper).")
_STATS = typer.Option(False, "--match-outside-stats", help="After every step, standardise the "
                      "region of X_t to the unedited X_t's per-channel mean and std outside it "
                      "(our addition; keeps removal from painting a new object).")
_REFRESH = typer.Option(50, help="Recompute the path and the sampling curve every N "
                        "iterations (m in Algorithm 1).")
_REFRESH_DRIFT = typer.Option(None, help="Re-walk the path whenever X_t has moved by more than "
                              "this fraction of its norm since the last walk (ours; 0: off). "
                              "Fast mode's reused path goes stale with that move. "
                              "Fast mode only. [default: 0.05 in fast mode]")
_BLEND_EVERY = typer.Option(70, help="Blend the outside of X_t back every N iterations.")
_LAMBDA1 = typer.Option(50.0, "--lambda1", help="Saliency/blend loss: weight λ1 of the "
                        "rate term λ1·r^λ2 (App. D).")
_FEATURE_WEIGHT = typer.Option(1.0, help="Saliency/blend loss: weight of the decoder "
                               "feature-alignment term (0 drops it).")
_SNAP = typer.Option(0, help="Keep an intermediate result every N iterations (strip.png).")
_CURVE_PROMPT = typer.Option("", help="Text prompt for conditional models (the paper uses "
                             "the empty prompt); conditions every U-Net call of the edit.")
_NOLOC = typer.Option(False, "--no-localized", help="Skip the localized blending of X_t.")
_DECODE_BLEND = typer.Option(True, "--decode-blend/--paper-decode", help="Also paste the "
                             "unedited path outside the region at every decode step above "
                             "--t-blend (our addition: keeps the outside on small images); "
                             "--paper-decode decodes as the paper does.")
_T_BLEND = typer.Option(500, "--t-blend", help="Blend X_t (and, with --decode-blend, the "
                        "decode) only above this timestep.")


@app.command()
@friendly_errors
def transfer(
    image: Path = typer.Argument(..., help="Image to edit."),
    reference: str = typer.Option(..., help="Reference pixel R,C whose curve the region copies."),
    mask: Path | None = _REGION_MASK, box: str | None = _REGION_BOX,
    model: str = typer.Option("default", help=MODEL_HELP), iterations: int | None = _ITER,
    t: int = _T, steps: int = _STEPS, lr: float = _LR, mode: str = _MODE,
    pixels_per_iteration: int | None = _PIXELS,
    match_outside_stats: bool = _STATS,
    refresh_every: int = _REFRESH, refresh_drift: float | None = _REFRESH_DRIFT,
    blend_every: int = _BLEND_EVERY,
    lambda1: float = _LAMBDA1, feature_weight: float = _FEATURE_WEIGHT,
    prompt: str = _CURVE_PROMPT,
    snapshot_every: int = _SNAP, no_localized: bool = _NOLOC,
    decode_blend: bool = _DECODE_BLEND, t_blend: int = _T_BLEND,
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/transfer"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP), force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Semantic transfer by curve matching: the region's generation curves are matched to the
    reference pixel's."""
    _curve_task("transfer", image, mask, box, reference, "decrease", _curve_options(locals()))


@app.command()
@friendly_errors
def remove(
    image: Path = typer.Argument(..., help="Image to edit."),
    mask: Path | None = _REGION_MASK, box: str | None = _REGION_BOX,
    reference: str | None = typer.Option(None, help="A background pixel R,C whose curve the "
                                         "object copies; without it the rate is minimised."),
    model: str = typer.Option("default", help=MODEL_HELP), iterations: int | None = _ITER,
    t: int = _T, steps: int = _STEPS, lr: float = _LR, mode: str = _MODE,
    pixels_per_iteration: int | None = _PIXELS,
    match_outside_stats: bool = _STATS,
    refresh_every: int = _REFRESH, refresh_drift: float | None = _REFRESH_DRIFT,
    blend_every: int = _BLEND_EVERY,
    lambda1: float = _LAMBDA1, feature_weight: float = _FEATURE_WEIGHT,
    prompt: str = _CURVE_PROMPT,
    snapshot_every: int = _SNAP, no_localized: bool = _NOLOC,
    decode_blend: bool = _DECODE_BLEND, t_blend: int = _T_BLEND,
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/remove"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP), force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Object removal by curve matching (to a background pixel, or a flat pseudo-curve)."""
    _curve_task("remove", image, mask, box, reference, "decrease", _curve_options(locals()))


@app.command()
@friendly_errors
def inpaint(
    image: Path = typer.Argument(..., help="Image to edit."),
    mask: Path | None = _REGION_MASK, box: str | None = _REGION_BOX,
    method: str = typer.Option("repaint", help="repaint: regenerate the region from noise with "
                               "the model (RePaint on the DDIM grid); mean-fill: the mean "
                               "colour of the rest. The baselines object removal is judged by."),
    model: str = typer.Option("default", help=MODEL_HELP), steps: int = _STEPS,
    resample: int = typer.Option(5, help="RePaint resamplings per step (1 = none)."),
    prompt: str = typer.Option("", help="Text prompt (conditional models)."),
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/inpaint"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP), force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Fill a region from its surroundings: the inpainting baselines for object removal."""
    from diffgeo.io import parse_box
    from diffgeo.runs import inpaint_image

    res = inpaint_image(image, model=model, mask=mask, box=parse_box(box) if box else None,
                        method=method, num_steps=steps, resample=resample, prompt=prompt,
                        fit=fit, out=out, device=device, dtype=dtype, seed=seed, force=force,
                        progress=True)
    loc = res["locality"]
    typer.echo(f"{method}: MSE inside {loc['mse_inside']:.4g}, outside {loc['mse_outside']:.3g};"
               f" wrote {out}/")


@app.command("adjust-saliency")
@friendly_errors
def adjust_saliency(
    image: Path = typer.Argument(..., help="Image to edit."),
    increase: bool = typer.Option(False, "--increase", help="Make the region more salient."),
    decrease: bool = typer.Option(False, "--decrease", help="Make the region less salient."),
    mask: Path | None = _REGION_MASK, box: str | None = _REGION_BOX,
    model: str = typer.Option("default", help=MODEL_HELP), iterations: int | None = _ITER,
    t: int = _T, steps: int = _STEPS, lr: float = _LR, mode: str = _MODE,
    pixels_per_iteration: int | None = _PIXELS,
    match_outside_stats: bool = _STATS,
    refresh_every: int = _REFRESH, refresh_drift: float | None = _REFRESH_DRIFT,
    blend_every: int = _BLEND_EVERY,
    lambda1: float = _LAMBDA1, feature_weight: float = _FEATURE_WEIGHT,
    prompt: str = _CURVE_PROMPT,
    snapshot_every: int = _SNAP, no_localized: bool = _NOLOC,
    decode_blend: bool = _DECODE_BLEND, t_blend: int = _T_BLEND,
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/saliency-edit"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP), force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Saliency increase or decrease: λ1·|r|^(∓1) plus decoder feature alignment (App. D)."""
    if increase == decrease:
        from diffgeo.errors import InputError

        raise InputError("give exactly one of --increase or --decrease")
    _curve_task("saliency", image, mask, box, None, "increase" if increase else "decrease",
                _curve_options(locals()))


@app.command()
@friendly_errors
def blend(
    image: Path = typer.Argument(..., help="A composite (foreground pasted on a background)."),
    mask: Path | None = typer.Option(None, "--mask", help="Foreground mask (white = pasted)."),
    model: str = typer.Option("default", help=MODEL_HELP), iterations: int | None = _ITER,
    t: int = _T, steps: int = _STEPS, lr: float = _LR, mode: str = _MODE,
    pixels_per_iteration: int | None = _PIXELS,
    match_outside_stats: bool = _STATS,
    refresh_every: int = _REFRESH, refresh_drift: float | None = _REFRESH_DRIFT,
    blend_every: int = _BLEND_EVERY,
    lambda1: float = _LAMBDA1, feature_weight: float = _FEATURE_WEIGHT,
    prompt: str = _CURVE_PROMPT,
    snapshot_every: int = _SNAP, no_localized: bool = _NOLOC,
    decode_blend: bool = _DECODE_BLEND, t_blend: int = _T_BLEND,
    fit: str | None = typer.Option(None, help=FIT_HELP),
    out: Path = typer.Option(Path("out/blend"), help="Output folder."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP), force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Image blending: decrease the saliency of the seam (the mask's 3×3 boundary band)."""
    _curve_task("blend", image, mask, None, None, "decrease", _curve_options(locals()))


@app.command()
@friendly_errors
def train(
    out: Path = typer.Option(Path("runs/model"), help="Run folder (checkpoint/, model/, log)."),
    data: str = typer.Option("scenes", help="'scenes' (the built-in ground-truth scene set) or "
                             "a folder of images (cropped to the resolution)."),
    preset: str = typer.Option("default-32", help="U-Net shape: default-32, default-64, tiny-16."),
    resolution: int | None = typer.Option(None, help="Override the preset's resolution."),
    steps: int = typer.Option(6000, help="Total optimiser steps (a resumed run continues "
                              "up to this number)."),
    batch_size: int = typer.Option(32, help="Images per step."),
    lr: float = typer.Option(5e-4, help="Peak learning rate (AdamW, warm-up then cosine)."),
    warmup: int = typer.Option(200, help="Linear warm-up steps."),
    min_snr_gamma: float = typer.Option(5.0, help="min-SNR-γ loss weighting; 0 disables."),
    ema_decay: float = typer.Option(0.999, help="EMA decay of the exported weights."),
    num_scenes: int = typer.Option(20000, help="Training scenes drawn when --data scenes."),
    checkpoint_every: int = typer.Option(250, help="Steps between resumable checkpoints."),
    resume: str | None = typer.Option(None, help="Checkpoint or model folder to continue from "
                                      "(e.g. 'default' to continue the shipped model). A run "
                                      "folder with a checkpoint resumes by itself."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    threads: int | None = typer.Option(None, help="CPU threads (default: torch's choice)."),
    seed: int = typer.Option(0, help=SEED_HELP),
) -> None:
    """Train a pixel DDPM (UNet2DModel, linear betas 1e-4..0.02, T=1000) with EMA weights and
    resumable checkpoints; exports a folder that --model accepts."""
    from diffgeo.backbones.load import default_model_path
    from diffgeo.train import TrainConfig
    from diffgeo.train import train as run

    if resume == "default":
        resume = str(default_model_path())
    cfg = TrainConfig(out=str(out), data=data, preset=preset, resolution=resolution, steps=steps,
                      batch_size=batch_size, lr=lr, warmup_steps=warmup,
                      min_snr_gamma=min_snr_gamma or None, ema_decay=ema_decay,
                      num_scenes=num_scenes, checkpoint_every=checkpoint_every, resume=resume,
                      device=device, threads=threads, seed=seed)
    path = run(cfg, progress=True)
    typer.echo(f"model written to {path}  (use --model {path})")


@app.command()
@friendly_errors
def demo(
    out: Path = typer.Option(Path("diffgeo-demo"), help="Output folder for index.html."),
    model: str = typer.Option("default", help=MODEL_HELP),
    quick: bool = typer.Option(False, help="A reduced run (fewer scenes and steps), for CI."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    seed: int = typer.Option(0, help=SEED_HELP),
    force: bool = typer.Option(False, help=FORCE_HELP),
) -> None:
    """Run every diffgeo feature on the default model and bundled scenes; writes
    DIR/index.html, a page of images and plots."""
    from diffgeo.demo import run_demo

    page = run_demo(out=out, model=model, quick=quick, device=device, seed=seed, force=force)
    typer.echo(f"open {page}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
