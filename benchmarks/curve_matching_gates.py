"""Quality gates of curve matching (issue 5) on the default model's held-out scenes.

    python benchmarks/curve_matching_gates.py --out runs/cm-gates [--gates removal,saliency,modes]
        [--scenes 8] [--removal-iterations 100] [--mode-scenes 5] [--mode-iterations 60]

Every scene has its ground truth (the clean background, the object mask), so:

- **removal**: the object (mask dilated by one pixel, so anti-aliased edges go too) is removed by
  curve matching to a background pixel's curve (``tasks.remove``), by repainting the region from
  noise with the same model (``editing.repaint``, RePaint with resampling) and by a mean-colour
  fill (``editing.mean_fill``); curve matching also with ``match_outside_stats`` (our
  addition). Reported per method: masked MSE and PSNR of the region against
  the true background, and MSE outside the region against the input.
- **saliency**: ``tasks.saliency`` increase and decrease on the object; the region's fluctuation
  (mean rate ‖Dh[e_p]‖ over 8 fixed object pixels, traced along each image's full DDIM inversion
  path, sliding-window variance for t > 200, ``curves.fluctuation``) before and after; the gate
  is that it moves in the requested direction on >= 80% of scenes, with the MSE outside small.
  Beside it, two image-space proxies of what a viewer sees: the region's colour contrast
  against a ring around it, and its fine detail (mean absolute finite difference).
- **modes**: variants MODE/PAIRS (``--mode-variants``; pairs = (pixel, timestep) pairs per
  iteration) on the same removals, each against the first (faithful/1, the paper): final loss
  (mean of the last 10 iterations), the region curve loss (16 fixed region pixels, every level:
  seed-independent), the PSNR between the edited images and the speed-up; the gate is a loss
  within 10%. ``--seed-control`` adds the first variant with another seed: the noise floor.

Writes results.json, summary.md and figures (removal.png, saliency.png, modes.png) under --out.
Timings are wall-clock on whatever machine runs it; ratios only make sense within one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from diffgeo import sampling
from diffgeo.backbones import load_backbone
from diffgeo.curves import (
    Component,
    fluctuation,
    generation_curves,
    pixel_direction,
    rates_at,
    salient_and_background_pixels,
)
from diffgeo.data import bundled_scenes
from diffgeo.editing import mean_fill, repaint, tasks
from diffgeo.editing.curve_matching import (
    CurveMatchingConfig,
    CurveMatchingResult,
    blended_decode,
    full_path,
)
from diffgeo.sampling import Trajectory


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() * 2 - 1


def dilate(mask: np.ndarray) -> np.ndarray:
    m = torch.from_numpy((mask > 0.5).astype(np.float32))[None, None]
    return F.max_pool2d(m, 3, stride=1, padding=1)[0, 0].numpy()


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: np.ndarray) -> float:
    m = torch.from_numpy(mask > 0.5)
    if not bool(m.any()):
        return float("nan")
    return float(((a - b)[..., m] ** 2).mean())


def psnr_from_mse(mse: float) -> float:
    return float(10 * np.log10(4.0 / mse)) if mse > 0 else float("inf")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x[0].permute(1, 2, 0).clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)


def save_rows(rows: list[list[torch.Tensor]], header: list[str], path: Path, scale: int = 4):
    """A grid image: one row per scene, one column per panel, upscaled nearest-neighbour."""
    tiles = [[to_uint8(x) for x in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    gap = 2
    grid = np.full((len(rows) * (h + gap), len(header) * (w + gap), 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    im = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                      Image.NEAREST)
    im.save(path)
    (path.with_suffix(".txt")).write_text("columns: " + ", ".join(header) + "\n")


def summarise(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "std": float(v.std()) if v.size else float("nan"), "n": int(v.size)}


# ------------------------------------------------------------------------------------ removal
def with_decode_blend(bb, image: torch.Tensor, region: np.ndarray, res: CurveMatchingResult,
                      cfg: CurveMatchingConfig) -> torch.Tensor:
    """The same optimised X_t decoded with decode_blend (pasting the unedited path outside the
    region above t_blend) instead of the paper's plain decode: one extra decode, no re-run."""
    grid = sampling.Grid.for_model(bb, cfg.num_steps)
    cfg = cfg.on_grid(grid)
    with torch.no_grad():
        x_orig = sampling.invert(bb, bb.to_state(image.to(bb.device, bb.dtype)), cfg.t,
                                 grid).last
        orig_path = full_path(bb, x_orig, cfg.t, grid, None)
        x0 = blended_decode(bb, res.state.to(bb.device), orig_path, bb.state_region(region), cfg,
                            grid, None)
    return bb.to_image(x0).clamp(-1, 1).cpu()


REMOVAL_METHODS = ("curve matching", "curve matching + decode blend",
                   "curve matching + decode blend + outside stats", "repaint", "mean fill")


def removal_summary(per_scene: list[dict[str, Any]]) -> dict[str, Any]:
    methods = REMOVAL_METHODS
    summary = {m: {k: summarise([r[m][k] for r in per_scene])
                   for k in ("mse_inside_vs_background", "psnr_inside", "mse_outside_vs_input")}
               for m in methods}
    wins = {f"{c} beats {b}": int(sum(
        r[c]["mse_inside_vs_background"] < r[b]["mse_inside_vs_background"]
        for r in per_scene)) for c in methods[:3] for b in methods[3:]}
    return {"summary": summary, "wins": wins}


def removal_gate(bb, scenes, args, out: Path) -> dict[str, Any]:
    per_scene, panels = [], []
    for i, s in enumerate(tqdm(scenes, desc="removal gate"), start=args.first_scene):
        x, bg = as_tensor(s.composite), as_tensor(s.background)
        region = dilate(s.mask)
        _, ref = salient_and_background_pixels(region, np.random.default_rng(i), margin=3)
        cfg = CurveMatchingConfig(iterations=args.removal_iterations, seed=i,
                                  decode_blend=False)
        t0 = time.perf_counter()
        cm_result = tasks.remove(bb, x, region, ref, cfg)
        t_cm = time.perf_counter() - t0
        cm = cm_result.image
        cm_blend = with_decode_blend(bb, x, region, cm_result, cfg)
        cm_stats = tasks.remove(bb, x, region, ref, CurveMatchingConfig(
            iterations=args.removal_iterations, seed=i, match_outside_stats=True)).image
        t0 = time.perf_counter()
        rp = repaint(bb, x, region, grid=50, resample=args.repaint_resample,
                     generator=torch.Generator().manual_seed(i))
        t_rp = time.perf_counter() - t0
        mf = mean_fill(x, region)
        row: dict[str, Any] = {"scene": i, "object": s.object_name,
                               "background": s.background_name, "reference": list(ref),
                               "region_pixels": int(region.sum()),
                               "seconds": {"curve matching": t_cm, "repaint": t_rp}}
        outside = 1 - region
        for name, img in zip(REMOVAL_METHODS, (cm, cm_blend, cm_stats, rp, mf), strict=True):
            mse = masked_mse(img, bg, region)
            row[name] = {"mse_inside_vs_background": mse, "psnr_inside": psnr_from_mse(mse),
                         "mse_outside_vs_input": masked_mse(img, x, outside)}
        per_scene.append(row)
        panels.append([x, bg, cm, cm_blend, cm_stats, rp, mf])
    save_rows(panels, ["input", "true background", *REMOVAL_METHODS], out / "removal.png")
    return {"scenes": per_scene, **removal_summary(per_scene),
            "settings": {"iterations": args.removal_iterations, "t": 700, "t_blend": 500,
                         "repaint_resample": args.repaint_resample, "region": "mask dilated 3x3"}}


# ----------------------------------------------------------------------------------- saliency
def region_fluctuation(bb, image: torch.Tensor, pixels: tuple[tuple[int, int], ...],
                       num_steps: int) -> float:
    grid = sampling.Grid.for_model(bb, num_steps)
    with torch.no_grad():
        inv = sampling.invert(bb, bb.to_state(image.to(bb.device, bb.dtype)), grid.top, grid)
    curves = generation_curves(bb, inv, [Component("region", pixels)], "h")
    return float(fluctuation(curves.values[0], curves.timesteps))


def latent_region_fluctuation(bb, state: torch.Tensor, t: int, num_steps: int,
                              pixels: tuple[tuple[int, int], ...]) -> float:
    """The region's fluctuation on the DDIM path through a state X_t itself (the optimiser's
    variable), not through the inversion of its decoded image: where the two disagree, the
    edit did not survive decoding."""
    grid = sampling.Grid.for_model(bb, num_steps)
    with torch.no_grad():
        path = full_path(bb, state.to(bb.device, bb.dtype), t, grid, None)
    levels = sorted(path)
    traj = Trajectory(levels, [path[lv] for lv in levels], "inversion", grid)
    curves = generation_curves(bb, traj, [Component("region", pixels)], "h")
    return float(fluctuation(curves.values[0], curves.timesteps))


def object_pixels(mask: np.ndarray, k: int, seed: int) -> tuple[tuple[int, int], ...]:
    m = torch.from_numpy((mask > 0.5).astype(np.float32))[None, None]
    inner = (1 - F.max_pool2d(1 - m, 3, stride=1, padding=1))[0, 0].numpy() > 0.5
    cand = np.argwhere(inner if inner.sum() >= k else mask > 0.5)
    pick = np.random.default_rng(seed).choice(len(cand), size=min(k, len(cand)), replace=False)
    return tuple(sorted((int(cand[j][0]), int(cand[j][1])) for j in pick))


def region_contrast(image: torch.Tensor, mask: np.ndarray) -> float:
    """Colour contrast of the region: the distance between its mean colour and the mean colour
    of a ring 2-3 pixels around it (images in [-1, 1]). An image-space saliency proxy, to read
    beside the fluctuation, which is the paper's model-side statistic."""
    m = torch.from_numpy((mask > 0.5).astype(np.float32))[None, None]
    grow = lambda k: F.max_pool2d(m, k, stride=1, padding=k // 2)[0, 0] > 0.5  # noqa: E731
    inside, ring = m[0, 0] > 0.5, grow(7) & ~grow(3)
    return float((image[0][:, inside].mean(1) - image[0][:, ring].mean(1)).norm())


def region_detail(image: torch.Tensor, mask: np.ndarray) -> float:
    """Mean absolute finite difference (both axes) inside the region: fine detail."""
    m = torch.from_numpy(mask > 0.5)[:-1, :-1]
    x = image[0]
    dy, dx = (x[:, 1:, :-1] - x[:, :-1, :-1]).abs(), (x[:, :-1, 1:] - x[:, :-1, :-1]).abs()
    return float((dy[:, m].mean() + dx[:, m].mean()) / 2)


def moved_as_requested(direction: str, before: float, after: float) -> bool:
    return bool(after < before if direction == "decrease" else after > before)


SALIENCY_VARIANTS = ("decrease", "decrease + decode blend", "increase", "increase + decode blend")


def saliency_gate(bb, scenes, args, out: Path) -> dict[str, Any]:
    per_scene, panels = [], []
    for i, s in enumerate(tqdm(scenes, desc="saliency gate"), start=args.first_scene):
        x = as_tensor(s.composite)
        pixels = object_pixels(s.mask, 8, i)
        before = region_fluctuation(bb, x, pixels, args.curve_steps)
        row: dict[str, Any] = {"scene": i, "object": s.object_name, "pixels": pixels,
                               "fluctuation_before": before,
                               "contrast_before": region_contrast(x, s.mask),
                               "detail_before": region_detail(x, s.mask)}
        imgs = [x]
        cfg = CurveMatchingConfig(iterations=args.saliency_iterations, seed=i,
                                  decode_blend=False)
        cfg = cfg.on_grid(sampling.Grid.for_model(bb, cfg.num_steps))
        with torch.no_grad():
            x_t = sampling.invert(bb, bb.to_state(x.to(bb.device, bb.dtype)), cfg.t,
                                  cfg.num_steps).last
        lat_before = latent_region_fluctuation(bb, x_t, cfg.t, cfg.num_steps, pixels)
        row["latent_fluctuation_before"] = lat_before
        for direction in ("decrease", "increase"):
            res = tasks.saliency(bb, x, s.mask, direction, cfg)
            lat_after = latent_region_fluctuation(bb, res.state, cfg.t, cfg.num_steps, pixels)
            decoded = {"": res.image,
                       " + decode blend": with_decode_blend(bb, x, s.mask, res, cfg)}
            for suffix, img in decoded.items():
                after = region_fluctuation(bb, img, pixels, args.curve_steps)
                row[direction + suffix] = {
                    "fluctuation_after": after,
                    "moved_as_requested": moved_as_requested(direction, before, after),
                    "latent_fluctuation_after": lat_after,
                    "moved_on_latent": moved_as_requested(direction, lat_before, lat_after),
                    "relative_change": (after - before) / before,
                    "mse_outside": masked_mse(img, x, 1 - s.mask),
                    "mse_inside": masked_mse(img, x, s.mask),
                    "contrast_after": region_contrast(img, s.mask),
                    "detail_after": region_detail(img, s.mask)}
                imgs.append(img)
        per_scene.append(row)
        panels.append(imgs)
    save_rows(panels, ["input", *SALIENCY_VARIANTS], out / "saliency.png")
    summary = saliency_summary(per_scene)
    return {"scenes": per_scene, "summary": summary,
            "settings": {"iterations": args.saliency_iterations, "t_blend": 500, "pixels": 8,
                         "curve_steps": args.curve_steps, "definition": "h", "window": 5,
                         "t_min": 200}}


def saliency_summary(per_scene: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        d: {"fraction_moved": float(np.mean([r[d]["moved_as_requested"] for r in per_scene])),
            "scenes_moved": int(sum(r[d]["moved_as_requested"] for r in per_scene)),
            # older result files lack the latent-side measurement
            **({"fraction_moved_on_latent": float(np.mean([r[d]["moved_on_latent"]
                                                           for r in per_scene]))}
               if all("moved_on_latent" in r[d] for r in per_scene) else {}),
            "relative_change": summarise([r[d]["relative_change"] for r in per_scene]),
            "mse_outside": summarise([r[d]["mse_outside"] for r in per_scene]),
            "mse_inside": summarise([r[d]["mse_inside"] for r in per_scene]),
            "fraction_contrast_up": float(np.mean(
                [r[d]["contrast_after"] > r["contrast_before"] for r in per_scene])),
            "fraction_detail_up": float(np.mean(
                [r[d]["detail_after"] > r["detail_before"] for r in per_scene])),
            "contrast_after": summarise([r[d]["contrast_after"] for r in per_scene]),
            "detail_after": summarise([r[d]["detail_after"] for r in per_scene])}
        for d in SALIENCY_VARIANTS}
    summary["input"] = {"contrast": summarise([r["contrast_before"] for r in per_scene]),
                        "detail": summarise([r["detail_before"] for r in per_scene])}
    return summary


# -------------------------------------------------------------------------------------- modes
def region_curve_loss(bb, res: CurveMatchingResult, region: np.ndarray, k: int = 16) -> float:
    """Mean |r_t(p) - c*(t)| over k fixed region pixels and every grid level of the final X_t's
    path: the matching loss with the optimiser's random pixel and timestep draws taken out, so
    two runs can be compared on the same pixels whatever their seeds."""
    cand = np.argwhere(region > 0.5)
    pick = cand[np.random.default_rng(0).choice(len(cand), size=min(k, len(cand)),
                                                replace=False)]
    dirs = torch.stack([pixel_direction(bb, (int(r), int(c))) for r, c in pick])
    cfg = res.settings
    with torch.no_grad():
        path = full_path(bb, res.state.to(bb.device, bb.dtype), cfg["t"], cfg["num_steps"], None)
    ref = res.reference_curve
    losses = [(rates_at(bb, path[t], t, dirs, "h").float().cpu() - float(ref[j])).abs().mean()
              for j, t in enumerate(sorted(path))]
    return float(torch.stack(losses).mean())


def parse_variants(text: str) -> dict[str, tuple[str, int]]:
    """'faithful/1,fast/4' -> {'faithful/1': ('faithful', 1), 'fast/4': ('fast', 4)}."""
    out = {}
    for item in (v.strip() for v in text.split(",") if v.strip()):
        mode, _, pairs = item.partition("/")
        if mode not in ("fast", "faithful") or not pairs.isdigit() or int(pairs) < 1:
            raise SystemExit(f"--mode-variants: {item!r} is not MODE/PAIRS "
                             "(fast/4, faithful/1, ...)")
        out[item] = (mode, int(pairs))
    if len(out) < 2:
        raise SystemExit("--mode-variants: give at least two variants (the first is the "
                         "reference)")
    return out


def drift_for(mode: str, drift: float | None) -> float | None:
    """--refresh-drift for one variant: faithful mode takes none (it re-walks every step)."""
    return None if mode == "faithful" else drift


SEED_STRIDE = 100_000  # keeps every seed of a scene apart from --seed-control's offset (1000)


def modes_gate(bb, scenes, args, out: Path) -> dict[str, Any]:
    """Every variant against the first (by default faithful/1, the paper) on the same
    removals; with --seed-control also the first with another seed (the noise floor: how far
    two runs of one variant land apart when only the sampled pixels and timesteps differ)."""
    variants = parse_variants(args.mode_variants)
    reference = next(iter(variants))
    runs = {name: (mode, pairs, 0) for name, (mode, pairs) in variants.items()}
    if args.seed_control:
        runs[f"{reference}, other seed"] = (*variants[reference], 1000)
    per_scene, panels = [], []
    for i, s in enumerate(tqdm(scenes, desc="fast vs faithful"), start=args.first_scene):
        x = as_tensor(s.composite)
        region = dilate(s.mask)
        _, ref = salient_and_background_pixels(region, np.random.default_rng(i), margin=3)
        row: dict[str, Any] = {"scene": i, "reference": list(ref)}
        imgs = {}
        for name, (mode, pairs, seed_offset) in runs.items():
            per_seed = []
            for j in range(args.mode_seeds):
                cfg = CurveMatchingConfig(iterations=args.mode_iterations, mode=mode,
                                          refresh_every=args.refresh_every,
                                          refresh_drift=drift_for(mode, args.refresh_drift),
                                          seed=i + seed_offset + SEED_STRIDE * j,
                                          pixels_per_iteration=pairs, decode_blend=False)
                t0 = time.perf_counter()
                res = tasks.remove(bb, x, region, ref, cfg)
                secs = time.perf_counter() - t0
                per_seed.append({
                    "seconds_per_iteration": secs / args.mode_iterations,
                    "final_loss": float(np.mean(res.losses[-10:])),
                    "curve_loss": float((res.region_curve_after
                                         - res.reference_curve).abs().mean()),
                    "region_curve_loss": region_curve_loss(bb, res, region),
                    "refreshes": res.settings["refreshes"],
                    "drift_refreshes": res.settings["drift_refreshes"],
                    "curve_loss_before": float((res.region_curve_before
                                                - res.reference_curve).abs().mean())})
                if j == 0:
                    imgs[name] = res.image
            # With several seeds the comparison is between expected losses: the mean over the
            # optimiser's own pixel/timestep draws, which single runs only sample.
            row[name] = {k: float(np.mean([d[k] for d in per_seed])) for k in per_seed[0]}
            if len(per_seed) > 1:
                row[name]["per_seed"] = per_seed
        f = row[reference]
        for name in runs:
            if name == reference:
                continue
            q = row[name]
            q["vs_reference"] = {
                **loss_rel_diffs(row, name, reference),
                "curve_loss_rel_diff": abs(q["curve_loss"] - f["curve_loss"]) / f["curve_loss"],
                "psnr_vs_reference": psnr_from_mse(float(((imgs[name] - imgs[reference]) ** 2)
                                                         .mean())),
                "speedup": f["seconds_per_iteration"] / q["seconds_per_iteration"]}
        per_scene.append(row)
        panels.append([x, *imgs.values()])
    save_rows(panels, ["input", *runs], out / "modes.png")
    return {"scenes": per_scene, "summary": modes_summary(per_scene, list(runs), reference),
            "settings": {"iterations": args.mode_iterations, "variants": list(runs),
                         "refresh_every": args.refresh_every, "seeds": args.mode_seeds,
                         "refresh_drift": {name: CurveMatchingConfig(
                             mode=mode, refresh_drift=drift_for(mode, args.refresh_drift)
                         ).drift_tolerance for name, (mode, _, _) in runs.items()}}}


def loss_rel_diffs(row: dict[str, Any], a: str, b: str) -> dict[str, float]:
    """Relative differences of variant a's losses from variant b's on one scene."""
    return {k: abs(row[a][key] - row[b][key]) / row[b][key]
            for k, key in (("final_loss_rel_diff", "final_loss"),
                           ("region_loss_rel_diff", "region_curve_loss"))}


def modes_summary(per_scene: list[dict[str, Any]], runs: list[str],
                  reference: str) -> dict[str, Any]:
    summary: dict[str, Any] = {"reference": reference}
    for name in runs:
        if name == reference:
            continue
        d = [r[name]["vs_reference"] for r in per_scene]
        summary[name] = {k: summarise([x[k] for x in d]) for k in d[0]}
        summary[name]["scenes_final_loss_within_10pct"] = int(
            sum(x["final_loss_rel_diff"] <= 0.10 for x in d))
        summary[name]["scenes_region_loss_within_10pct"] = int(
            sum(x["region_loss_rel_diff"] <= 0.10 for x in d))
    # fast/N against faithful/N: the ΔX reuse alone, at the same number of pairs.
    summary["same_pairs"] = {}
    for name in runs:
        mode, _, pairs = name.partition("/")
        other = f"faithful/{pairs}"
        if mode == "fast" and other in runs:
            d = [loss_rel_diffs(r, name, other) for r in per_scene]
            summary["same_pairs"][f"{name} vs {other}"] = {
                **{k: summarise([x[k] for x in d]) for k in d[0]},
                "scenes_final_loss_within_10pct": int(sum(x["final_loss_rel_diff"] <= 0.10
                                                          for x in d)),
                "scenes_region_loss_within_10pct": int(sum(x["region_loss_rel_diff"] <= 0.10
                                                           for x in d))}
    summary["mean_region_curve_loss"] = {
        m: float(np.mean([r[m]["region_curve_loss"] for r in per_scene])) for m in runs}
    summary["mean_seconds_per_iteration"] = {
        m: float(np.mean([r[m]["seconds_per_iteration"] for r in per_scene])) for m in runs}
    return summary


def fmt(s: dict[str, float], digits: int = 4) -> str:
    return f"{s['mean']:.{digits}g} ± {s['std']:.{digits}g} (N={s['n']})"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Curve-matching quality gates ({results['date']}, {results['model']})", ""]
    if "removal" in results:
        r = results["removal"]
        lines += ["## Object removal (region vs true background)", "",
                  "| method | masked MSE | PSNR inside (dB) | MSE outside vs input |",
                  "|---|---|---|---|"]
        for m, s in r["summary"].items():
            lines.append(f"| {m} | {fmt(s['mse_inside_vs_background'])} | "
                         f"{fmt(s['psnr_inside'])} | {fmt(s['mse_outside_vs_input'])} |")
        lines += ["", "Scenes where curve matching has the lower masked MSE: "
                  + ", ".join(f"{k}: {v}/{len(r['scenes'])}" for k, v in r["wins"].items()), ""]
    if "saliency" in results:
        r = results["saliency"]
        lines += ["## Saliency decrease / increase (region fluctuation)", "",
                  "| direction | moved as requested | moved on the optimised X_t | "
                  "relative change | MSE outside | "
                  "MSE inside | colour contrast (up on) | detail (up on) |",
                  "|---|---|---|---|---|---|---|---|"]
        inp = r["summary"]["input"]
        lines.append(f"| input | – | – | – | – | – | {fmt(inp['contrast'], 3)} | "
                     f"{fmt(inp['detail'], 3)} |")
        for d, s in r["summary"].items():
            if d == "input":
                continue
            latent = (f"{100 * s['fraction_moved_on_latent']:.0f}%"
                      if "fraction_moved_on_latent" in s else "–")
            lines.append(f"| {d} | {100 * s['fraction_moved']:.0f}% | {latent} | "
                         f"{fmt(s['relative_change'], 3)} | {fmt(s['mse_outside'])} | "
                         f"{fmt(s['mse_inside'])} | {fmt(s['contrast_after'], 3)} "
                         f"({100 * s['fraction_contrast_up']:.0f}%) | "
                         f"{fmt(s['detail_after'], 3)} ({100 * s['fraction_detail_up']:.0f}%) |")
        lines += ["", "Colour contrast: distance between the region's mean colour and that of "
                  "a ring 2-3 px around it; detail: mean absolute finite difference inside "
                  "(images in [-1, 1]); both image-space proxies beside the paper's "
                  "fluctuation statistic. \"Moved as requested\" measures the fluctuation on "
                  "the inversion of the edited image (what a user gets); \"moved on the "
                  "optimised X_t\" on the DDIM path through the optimiser's own variable, "
                  "before decoding (the same for both decodes).", ""]
    if "modes" in results:
        s = results["modes"]["summary"]
        ref = s["reference"]
        lines += [f"## Fast vs faithful (against {ref})", "",
                  "| variant | s/it | speed-up | final loss rel. diff | within 10% | "
                  "region curve loss rel. diff | within 10% | mean region curve loss | "
                  "PSNR vs reference (dB) |", "|---|---|---|---|---|---|---|---|---|"]
        sec, loss = s["mean_seconds_per_iteration"], s["mean_region_curve_loss"]
        lines.append(f"| {ref} | {sec[ref]:.3g} | 1 | – | – | – | – | {loss[ref]:.4g} | – |")
        for name, v in s.items():
            if name == "same_pairs" or not isinstance(v, dict) or "speedup" not in v:
                continue
            n = v["speedup"]["n"]
            lines.append(
                f"| {name} | {sec[name]:.3g} | {fmt(v['speedup'], 3)} | "
                f"{fmt(v['final_loss_rel_diff'], 3)} | {v['scenes_final_loss_within_10pct']}/{n}"
                f" | {fmt(v['region_loss_rel_diff'], 3)} | "
                f"{v['scenes_region_loss_within_10pct']}/{n} | {loss[name]:.4g} | "
                f"{fmt(v['psnr_vs_reference'], 3)} |")
        for name, v in s.get("same_pairs", {}).items():
            n = v["final_loss_rel_diff"]["n"]
            lines.append(f"| {name} (same pairs) | – | – | {fmt(v['final_loss_rel_diff'], 3)} | "
                         f"{v['scenes_final_loss_within_10pct']}/{n} | "
                         f"{fmt(v['region_loss_rel_diff'], 3)} | "
                         f"{v['scenes_region_loss_within_10pct']}/{n} | – | – |")
        lines += ["", "Region curve loss: mean |r_t(p) − c*(t)| over 16 fixed region pixels "
                  "and every level of the final X_t's path (seed-independent). Final loss: "
                  "mean of the last 10 iteration losses.", ""]
        seeds = results["modes"]["settings"].get("seeds", 1)
        if seeds > 1:
            lines += [f"Every variant ran {seeds} times per scene with different seeds; each "
                      "loss is the mean over them (the expected loss over the optimiser's "
                      "pixel and timestep draws), and the variants are compared on those "
                      "means.", ""]
    return "\n".join(lines)


def merge(paths: list[Path], out: Path) -> dict[str, Any]:
    """One result from runs over disjoint scene ranges (--first-scene): scenes are seeded by
    their index, so the merge equals a single run over all of them; summaries are recomputed
    and the image panels stacked."""
    parts = [json.loads(p.read_text()) for p in paths]
    merged: dict[str, Any] = {k: parts[0][k] for k in ("model", "date", "threads")}
    merged["args"] = [p["args"] for p in parts]
    merged["seconds"] = float(sum(p["seconds"] for p in parts))
    for gate, png in (("removal", "removal.png"), ("saliency", "saliency.png"),
                      ("modes", "modes.png")):
        have = [(p, path) for p, path in zip(parts, paths, strict=True) if gate in p]
        if not have:
            continue
        scenes = sorted((r for p, _ in have for r in p[gate]["scenes"]),
                        key=lambda r: r["scene"])
        if len({r["scene"] for r in scenes}) != len(scenes):
            raise SystemExit(f"--merge: the {gate} runs share scenes; give disjoint ranges")
        settings = have[0][0][gate]["settings"]
        if gate == "removal":
            merged[gate] = {"scenes": scenes, **removal_summary(scenes), "settings": settings}
        elif gate == "saliency":
            merged[gate] = {"scenes": scenes, "summary": saliency_summary(scenes),
                            "settings": settings}
        else:
            reference = have[0][0][gate]["summary"]["reference"]
            merged[gate] = {"scenes": scenes, "settings": settings,
                            "summary": modes_summary(scenes, settings["variants"], reference)}
        images = [path.parent / png for _, path in
                  sorted(have, key=lambda h: min(r["scene"] for r in h[0][gate]["scenes"]))]
        if all(im.exists() for im in images):
            stacked = np.concatenate([np.asarray(Image.open(im).convert("RGB"))
                                      for im in images])
            Image.fromarray(stacked).save(out / png)
            header = images[0].with_suffix(".txt")
            if header.exists():
                (out / png).with_suffix(".txt").write_text(header.read_text())
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", type=Path, default=Path("runs/cm-gates"))
    ap.add_argument("--gates", default="removal,saliency,modes")
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--first-scene", type=int, default=0)
    ap.add_argument("--removal-iterations", type=int, default=100)
    ap.add_argument("--repaint-resample", type=int, default=5)
    ap.add_argument("--saliency-iterations", type=int, default=70)
    ap.add_argument("--curve-steps", type=int, default=50)
    ap.add_argument("--mode-scenes", type=int, default=5)
    ap.add_argument("--mode-iterations", type=int, default=60)
    ap.add_argument("--refresh-every", type=int, default=20)
    ap.add_argument("--refresh-drift", type=float, default=None,
                    help="modes gate: refresh_drift of the fast variants (default 0.05, fast "
                         "mode's own; 0: periodic refresh only)")
    ap.add_argument("--mode-variants", default="faithful/1,fast/1,fast/4,faithful/4",
                    help="modes gate: MODE/PAIRS variants, compared with the first")
    ap.add_argument("--mode-seeds", type=int, default=1,
                    help=f"modes gate: runs per variant and scene (seeds i + {SEED_STRIDE}*j); "
                         "losses are averaged over them before variants are compared")
    ap.add_argument("--seed-control", action="store_true",
                    help="modes gate: also run faithful with another seed (the noise floor)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                    help="merge the results.json of runs over disjoint --first-scene ranges "
                         "into --out instead of running anything")
    args = ap.parse_args()
    if args.merge:
        args.out.mkdir(parents=True, exist_ok=True)
        results = merge(args.merge, args.out)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
        text = markdown(results)
        (args.out / "summary.md").write_text(text)
        print(text)
        return
    gates = [g.strip() for g in args.gates.split(",") if g.strip()]
    unknown = set(gates) - {"removal", "saliency", "modes"}
    if unknown:
        raise SystemExit(f"--gates: unknown gate(s) {sorted(unknown)}; "
                         "choose from removal, saliency, modes")
    if args.mode_seeds < 1:
        raise SystemExit(f"--mode-seeds must be >= 1, got {args.mode_seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    bb = load_backbone(args.model)
    scenes = bundled_scenes(bb.image_size[0])[args.first_scene:args.first_scene + args.scenes]
    results: dict[str, Any] = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"),
                               "threads": torch.get_num_threads(), "args": vars(args) | {
                                   "out": str(args.out)}}
    t0 = time.perf_counter()
    if "removal" in gates:
        results["removal"] = removal_gate(bb, scenes, args, args.out)
    if "saliency" in gates:
        results["saliency"] = saliency_gate(bb, scenes, args, args.out)
    if "modes" in gates:
        results["modes"] = modes_gate(bb, scenes[:args.mode_scenes], args, args.out)
    results["seconds"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    text = markdown(results)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
