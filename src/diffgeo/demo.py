"""``diffgeo demo``: every feature on the default model and the bundled scenes, as one HTML page.

The page (``index.html``) links only to files written beside it, so the folder can be moved or
zipped as it is. Each feature contributes one *section*: a function ``(DemoContext) -> Section``
listed in ``SECTIONS``; later features append theirs. A section runs the verbs themselves
(:func:`diffgeo.verbs.run` on the scene written as a PNG beside the page, with the demo's
backbone), so what the page shows is what the CLI computes; only what no verb does (samples
from noise, a global direction, the saliency check over many scenes) calls the methods.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffgeo import sampling, verbs
from diffgeo.backbones.base import Backbone
from diffgeo.data.scenes import Scene, SceneConfig, bundled_scenes, generate_scenes
from diffgeo.errors import InputError
from diffgeo.io import ResultDir
from diffgeo.plots import grouped_bars
from diffgeo.verbs.common import environment, time_grid


@dataclass
class DemoContext:
    backbone: Backbone
    results: ResultDir
    scenes: list[Scene]
    quick: bool
    seed: int
    steps: int
    notes: list[str] = field(default_factory=list)

    def images(self, scenes: list[Scene]) -> torch.Tensor:
        arr = torch.stack([torch.from_numpy(s.composite).permute(2, 0, 1) for s in scenes])
        return (arr * 2 - 1).to(self.backbone.device, self.backbone.dtype)

    def grid(self, steps: int | None = None) -> sampling.Grid:
        return time_grid(self.backbone, steps or self.steps)

    def scene_file(self, name: str, scene: Scene) -> Path:
        """The scene's composite as a PNG beside the page: the input a verb reads."""
        return self.results.save_image(name, self.images([scene]).float().cpu())

    def mask_file(self, name: str, mask: torch.Tensor) -> Path:
        """A mask or map in [0, 1] as a grey PNG beside the page."""
        m = torch.as_tensor(mask).float().cpu().reshape(1, 1, *mask.shape[-2:])
        return self.results.save_image(name, m * 2 - 1)

    def run(self, verb: str, **options) -> verbs.Result:
        """A verb on the demo's backbone, writing nothing (the section saves what it shows)."""
        return verbs.run(verb, backbone=self.backbone, model=self.backbone.name or "default",
                         **options)


@dataclass
class Section:
    title: str
    body: str


def _img(src: str, caption: str = "", width: int = 128) -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="{html.escape(src)}" width="{width}" alt="{html.escape(caption)}">'
            f"{cap}</figure>")


def section_model(ctx: DemoContext) -> Section:
    summary = ctx.run("info").settings["summary"]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary.items())
    return Section("Model", f"<table>{rows}</table>")


def section_samples(ctx: DemoContext) -> Section:
    """Unconditional DDIM samples from seeded noise: what the model has learned."""
    bb = ctx.backbone
    n = 8 if ctx.quick else 16
    g = torch.Generator().manual_seed(ctx.seed)
    noise = torch.randn(n, *bb.state_shape, generator=g).to(bb.device, bb.dtype)
    grid = ctx.grid()
    with torch.no_grad():
        out = sampling.generate(bb, noise, grid.top, grid,
                            clip_x0=bb.kind == "pixel").last
        images = bb.to_image(out).float().cpu()
    per_row = 8
    rows = [list(images[i:i + per_row]) for i in range(0, n, per_row)]
    for r, row in enumerate(rows):
        ctx.results.save_strip(f"samples-{r}.png", [x[None] for x in row])
    imgs = "".join(_img(f"samples-{r}.png", "", width=per_row * 96) for r in range(len(rows)))
    clip = ", x̂0 clipped to [-1, 1]" if bb.kind == "pixel" else ""
    return Section("Samples", f"<p>{n} samples, DDIM {ctx.steps} steps from t={grid.top}{clip}, "
                   f"seed {ctx.seed}.</p>{imgs}")


def section_inversion(ctx: DemoContext) -> Section:
    """Plain vs exact DDIM inversion, regenerated: how faithful a starting X_t is."""
    bb = ctx.backbone
    k = 2 if ctx.quick else 6
    scenes = ctx.scenes[:k]
    grid = ctx.grid()
    t = 700 if 700 in grid else grid.top
    cells = []
    scores: dict[str, list[float]] = {"plain": [], "exact": []}
    iters: list[int] = []
    for i, scene in enumerate(scenes):
        image = ctx.scene_file(f"inv-{i}-input.png", scene)
        row = [_img(f"inv-{i}-input.png", "input")]
        for mode in ("plain", "exact"):
            res = ctx.run("invert", image=image, t=t, steps=ctx.steps, exact=mode == "exact")
            if mode == "plain":
                xt = bb.to_image(res.trajectory.last).clamp(-1, 1).float().cpu()
                ctx.results.save_image(f"inv-{i}-xt.png", xt)
                row.append(_img(f"inv-{i}-xt.png", f"X_{t}"))
            else:
                iters += res.trajectory.iterations
            scores[mode].append(res.psnr)
            ctx.results.save_image(f"inv-{i}-{mode}.png", res.reconstruction)
            row.append(_img(f"inv-{i}-{mode}.png", f"{mode}: {res.psnr:.1f} dB"))
        cells.append(f'<div class="row">{"".join(row)}</div>')
    plot = grouped_bars([f"scene {i}" for i in range(len(scenes))], scores,
                        ctx.results.path_for("inversion-psnr.png"), "PSNR (dB)",
                        f"Inversion to t={t} and back ({ctx.steps}-step grid)")
    text = (f"<p>Each held-out scene is DDIM-inverted to t={t} and regenerated "
            "(<code>diffgeo invert</code>, with and without <code>--exact</code>). Plain "
            "inversion evaluates ε at the wrong end of each step, so generation only "
            "approximately undoes it; exact inversion solves each step by fixed-point iteration "
            f"(mean {sum(iters) / max(1, len(iters)):.1f} ε-evaluations per step here). "
            f"Mean PSNR: plain {sum(scores['plain']) / len(scenes):.1f} dB, exact "
            f"{sum(scores['exact']) / len(scenes):.1f} dB.</p>")
    return Section("DDIM inversion and reconstruction",
                   text + "".join(cells) + _img(plot.name, "", width=520))


def section_curves(ctx: DemoContext) -> Section:
    """Generation curves of an object and a background pixel, the saliency map, and Fig. 3's
    salient-vs-background check over several held-out scenes."""
    import numpy as np

    from diffgeo import curves as C
    from diffgeo.io import to_uint8
    from diffgeo.maps import upsample_to_image
    from diffgeo.plots import curves_figure, definitions_figure, heatmap_figure

    bb = ctx.backbone
    scene = ctx.scenes[0]
    image = ctx.scene_file("curves-input.png", scene)
    rng = np.random.default_rng(ctx.seed)
    obj, bgp = C.salient_and_background_pixels(scene.mask, rng)
    t_min = 200 if ctx.grid().top > 300 else 0
    # Two pixels only: a region's curve costs one JVP per pixel per timestep; the region
    # contrast is read off the saliency map below, which covers every pixel at once.
    definition = "h" if ctx.quick else "all"
    res = ctx.run("curves", image=image, pixel=(obj, bgp), definition=definition,
                  steps=ctx.steps, t_min=t_min)
    cv = res.curves["h"]
    labels = [f"object pixel {obj}", f"background pixel {bgp}"]
    img = to_uint8(ctx.images([scene]).float().cpu())
    curves_figure(img, cv.timesteps, cv.values.numpy(), labels, [(obj,), (bgp,)],
                  ctx.results.path_for("curves.png"), "generation curves ‖Dh[e_ij]‖")
    fl = cv.fluctuation(5, t_min)
    parts = [f"<p>Curves of ‖D h[e_ij]‖ along the scene's DDIM inversion path "
             f"(<code>diffgeo curves</code>). Fluctuation (mean windowed variance, window 5, "
             f"t &gt; {t_min}): object pixel {fl[0]:.3g}, background pixel {fl[1]:.3g}.</p>",
             _img("curves.png", "", width=720)]
    if not ctx.quick:
        by_def = res.curves
        definitions_figure({d: c.timesteps for d, c in by_def.items()},
                           {d: c.values[0].numpy() for d, c in by_def.items()},
                           ctx.results.path_for("definitions.png"),
                           "object pixel: the four definitions of the rate (normalised)")
        parts.append("<p>The same object pixel under the four definitions of Fig. 5 (exact "
                     "projected rate, ‖Dε[Proj v]‖, ‖Dh[Proj v]‖, ‖Dh[v]‖), each normalised.</p>"
                     + _img("definitions.png", "", width=720))
    probes = 16 if ctx.quick else 48
    sal = ctx.run("saliency-map", image=image, estimator="probe", probes=probes,
                  steps=ctx.steps, t_min=t_min, seed=ctx.seed).saliency
    heatmap_figure(img, upsample_to_image(sal, bb.image_size).numpy(),
                   ctx.results.path_for("saliency.png"), "saliency map: fluctuation of every "
                   f"pixel's curve ({probes} probes, one VJP each per timestep)",
                   label="fluctuation")
    inside = torch.from_numpy(scene.mask > 0.5)
    parts.append(_img("saliency.png", "", width=720) + f"<p>Mean fluctuation inside the object "
                 f"{sal[inside].mean():.3g}, outside {sal[~inside].mean():.3g} "
                 "(<code>diffgeo saliency-map</code>).</p>")
    n = 3 if ctx.quick else 16
    subset = ctx.scenes[:n]
    check = C.saliency_check(bb, ctx.images(subset), [s.mask for s in subset], "h",
                             ctx.steps, t_min=t_min, seed=ctx.seed)
    from diffgeo.plots import saliency_check_figure

    saliency_check_figure(check.salient, check.background,
                          ctx.results.path_for("saliency-check.png"), f"{n} held-out scenes")
    parts.append(f"<p>Saliency check over {n} held-out scenes (object = salient): the object "
                 f"pixel's curve fluctuates more than a background pixel's in "
                 f"<b>{100 * check.fraction:.0f}%</b> of them (the paper: 86% on CAT2000 with "
                 "SD 2.1).</p>" + _img("saliency-check.png", "", width=360))
    return Section("Generation curves and saliency", "".join(parts))


def section_rbe(ctx: DemoContext) -> Section:
    """Region-based editing: directions for the object region of a scene and their strips."""
    from diffgeo.editing.rbe import RBEConfig, apply_direction, global_directions

    bb = ctx.backbone
    scene = ctx.scenes[1 % len(ctx.scenes)]
    image = ctx.scene_file("rbe-input.png", scene)
    mask = ctx.mask_file("rbe-mask.png", torch.from_numpy(scene.mask))
    steps = 10 if ctx.quick else 40
    k = 2 if ctx.quick else 3
    dirs = ctx.run("directions", image=image, mask=mask, steps=steps, k=k,
                   seed=ctx.seed).directions
    t = dirs.timestep  # the grid point nearest the paper's 500
    with torch.no_grad():
        state = bb.to_state(ctx.images([scene]))
    # The global direction (no mask) is the comparison no verb offers.
    glob = global_directions(bb, state, RBEConfig(t=t, k=1), grid=time_grid(bb, steps),
                             generator=torch.Generator().manual_seed(ctx.seed))
    strengths = [-30.0, -15.0, 15.0, 30.0]
    rows, ratios = [], []
    for i in range(dirs.k):
        edit = apply_direction(bb, state, dirs, i, strengths)
        ctx.results.save_strip(f"rbe-{i}.png", [im.float().cpu() for im in edit.strip()])
        loc = edit.locality(torch.from_numpy(scene.mask))
        ratios.append(loc[-1].ratio)
        rows.append(_img(f"rbe-{i}.png", f"direction {i} (σ={dirs.singular_values[i]:.3g}): "
                         f"α = 0, {', '.join(f'{a:+g}' for a in strengths)}", width=480))
    gedit = apply_direction(bb, state, glob, 0, strengths)
    ctx.results.save_strip("rbe-global.png", [im.float().cpu() for im in gedit.strip()])
    gloc = gedit.locality(torch.from_numpy(scene.mask))[-1]
    rows.append(_img("rbe-global.png", "global direction (no mask), same strengths", width=480))
    text = (f"<p>Directions in the U-Net bottleneck h for the object region "
            f"(<code>diffgeo directions</code>), found at t={t} ({steps}-step grid) by power "
            "iteration on the masked Jacobian ∂(M⊙ε)/∂h through the decoder only, projected "
            "against the unmasked region's leading direction (Eq. 14), and applied to the "
            "x̂0-prediction term only (Asyrp). Change inside / outside the object at α=+30: "
            f"{', '.join(f'{r:.1f}×' for r in ratios)} for the region directions, "
            f"{gloc.ratio:.1f}× for the global one.</p>")
    return Section("Region-based editing (h-space directions)", text + "".join(rows))


def section_exemplar(ctx: DemoContext) -> Section:
    """PIXELS: two exemplars (the objects of two other scenes) edited into one scene."""
    from diffgeo.editing.pixels import grow_and_blur

    bb = ctx.backbone
    n = len(ctx.scenes)
    source, ex1, ex2 = (ctx.scenes[i % n] for i in range(3))
    files = [ctx.scene_file(f"pixels-{k}.png", sc) for k, sc in enumerate((source, ex1, ex2))]
    maps = [ctx.mask_file(f"pixels-map-{k + 1}.png",
                          grow_and_blur(torch.from_numpy(sc.mask).float(), grow=1, blur=1.0))
            for k, sc in enumerate((ex1, ex2))]
    strength = 0.6
    res = ctx.run("exemplar", source=files[0], exemplar=tuple(files[1:]), map=tuple(maps),
                  strength=strength, steps=ctx.steps, seed=ctx.seed)
    imgs = ctx.images([source, ex1, ex2]).float().cpu()
    ctx.results.save_strip("pixels.png", [imgs[0:1], imgs[1:2], imgs[2:3], res.composite,
                                          res.image])
    size = tuple(bb.image_size)

    def up(m: torch.Tensor) -> torch.Tensor:
        m = torch.nn.functional.interpolate(m[None].float().cpu(), size=size, mode="nearest")
        return (m * 2 - 1).expand(-1, 3, -1, -1)

    edit = res.passes[0]
    ctx.results.save_strip("pixels-maps.png", [up(m) for m in edit.maps])
    shown = [edit.masks[round(i * (len(edit.masks) - 1) / 7)] for i in range(8)]
    ctx.results.save_strip("pixels-masks.png", [up(m) for m in shown])
    text = (f"<p>Progressive exemplar editing (PIXELS, Algorithm 2; <code>diffgeo "
            f"exemplar</code>): the objects of two other scenes are edited into the first one "
            f"in a single pass, from t={edit.timesteps[0]} (strength {strength}) over "
            f"{len(edit.timesteps)} DDIM steps with the linear threshold. Each map is the "
            "exemplar's object mask grown by one pixel and blurred (1 = keep source, 0 = take "
            "the exemplar); where maps overlap the second exemplar wins. Strip: source, "
            "exemplar 1, exemplar 2, copy-paste composite, result. Below: the maps at state "
            "resolution, and the mask that pins the noised source (white) at 8 evenly spaced "
            "steps, shrinking as the threshold rises.</p>")
    body = (text + _img("pixels.png", "source, exemplar 1, exemplar 2, composite, result",
                        width=480)
            + _img("pixels-maps.png", "edit maps as used", width=200)
            + _img("pixels-masks.png", "per-step source mask", width=480))
    return Section("Progressive exemplar editing (PIXELS)", body)


def section_curve_matching(ctx: DemoContext) -> Section:
    """One example of each curve-matching task on held-out scenes (Algorithm 1)."""
    import numpy as np

    from diffgeo.curves import salient_and_background_pixels

    steps = 10 if ctx.quick else 50
    grid = ctx.grid(steps)
    t = 700 if 700 in grid else grid.timesteps[len(grid) * 7 // 10]
    its = 4 if ctx.quick else 60
    common = dict(t=t, steps=steps, iterations=its, seed=ctx.seed,
                  refresh_every=max(1, its // 3), blend_every=max(1, its // 2))
    rng = np.random.default_rng(ctx.seed)
    scene = ctx.scenes[2 % len(ctx.scenes)]
    image = ctx.scene_file("cm-input.png", scene)
    mask = ctx.mask_file("cm-mask.png", torch.from_numpy(scene.mask))
    _, bg = salient_and_background_pixels(scene.mask, rng)
    edit = dict(image=image, mask=mask, **common)
    runs = {
        "remove (match a background pixel)": ("remove", dict(reference=bg)),
        "saliency increase": ("adjust-saliency", dict(increase=True)),
        "saliency decrease": ("adjust-saliency", dict(decrease=True)),
        "blend the object's seam": ("blend", {}),
    }
    cells = [_img("cm-input.png", "input")]
    removed = None
    for k, (label, (verb, extra)) in enumerate(runs.items()):
        res = ctx.run(verb, **edit, **extra)
        removed = res.image if removed is None else removed
        losses = res.method.losses
        ctx.results.save_image(f"cm-{k}.png", res.image)
        cells.append(_img(f"cm-{k}.png", f"{label}: loss {losses[0]:.3g} → {losses[-1]:.3g}"))
    # Removal against the scene's true background, beside the two baselines of the same code.
    truth = ctx.images([replace(scene, alpha=scene.alpha * 0)]).float().cpu()
    region = torch.from_numpy(scene.mask > 0.5)
    inpaint = dict(image=image, mask=mask, steps=steps, seed=ctx.seed)
    fills = {"curve matching": removed,
             "curve matching, --match-outside-stats":
                 ctx.run("remove", **edit, reference=bg, match_outside_stats=True).image,
             "repaint from noise": ctx.run("inpaint", **inpaint, method="repaint",
                                           resample=1 if ctx.quick else 5).image,
             "mean-colour fill": ctx.run("inpaint", **inpaint, method="mean-fill").image}
    ctx.results.save_image("cm-truth.png", truth)
    base = [_img("cm-truth.png", "true background")]
    for k, (label, im) in enumerate(fills.items()):
        mse = float(((im.float().cpu() - truth)[..., region] ** 2).mean())
        if label != "curve matching":
            ctx.results.save_image(f"cm-fill-{k}.png", im.float().cpu())
        name = "cm-0.png" if label == "curve matching" else f"cm-fill-{k}.png"
        base.append(_img(name, f"{label}: object-region MSE vs truth {mse:.3g}"))
    text = (f"<p>Curve matching optimises X_{t} with Adam ({its} iterations here, lr "
            "0.02) so that the object's generation curves take a wanted shape, then "
            "regenerates; localized blending keeps the rest of the image "
            "(<code>diffgeo remove | adjust-saliency | blend</code>). The background "
            "pixel for removal is one of the scene's own.</p>")
    text2 = ("<p>Removal has a ground truth here: the scene without its object. Shown with our "
             "<code>--match-outside-stats</code> too (the region of X_t kept on the "
             "background's noise statistics), and the two baselines the same code runs "
             "(<code>diffgeo inpaint --method repaint|mean-fill</code>); "
             "<code>benchmarks/curve_matching_gates.py</code> measures them over many scenes."
             "</p>")
    return Section("Curve matching: removal, saliency, blending",
                   text + f'<div class="row">{"".join(cells)}</div>' + text2
                   + f'<div class="row">{"".join(base)}</div>')


SECTIONS: list[Callable[[DemoContext], Section]] = [
    section_model, section_samples, section_inversion, section_curves, section_curve_matching,
    section_rbe,
]
SECTIONS.append(section_exemplar)

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{margin-bottom:0}section{margin:2em 0;border-top:1px solid #ddd}
img{image-rendering:pixelated;border:1px solid #ccc}figure{display:inline-block;margin:4px;
text-align:center;font-size:12px}.row{display:flex;flex-wrap:wrap;align-items:flex-end}
table{border-collapse:collapse;font-size:14px}th,td{padding:2px 10px;text-align:left}
th{color:#555;font-weight:normal}.note{color:#666;font-size:13px}"""


def _scenes_for(bb: Backbone, seed: int) -> list[Scene]:
    size = bb.image_size
    if size[0] != size[1]:
        raise InputError(f"the demo needs a square model, got {size}")
    try:
        return bundled_scenes(size[0])
    except InputError:  # a model of another size: draw procedural scenes at its size
        return list(generate_scenes(8, seed=seed, split="heldout",
                                    config=SceneConfig(size=size[0], objects="shapes")))


def run_demo(out: str | Path = "diffgeo-demo", model: str | Backbone = "default",
             quick: bool = False, device: str = "cpu", seed: int = 0,
             force: bool = False) -> Path:
    """Write ``out/index.html`` and the files it shows; returns the page path."""
    start = time.time()
    if isinstance(model, Backbone):
        bb = model
    else:
        from diffgeo.backbones import load_backbone

        bb = load_backbone(model, device=device)
    results = ResultDir(out, force=force)
    results.path_for("index.html")  # refuse before computing, not after
    ctx = DemoContext(backbone=bb, results=results, scenes=_scenes_for(bb, seed), quick=quick,
                      seed=seed, steps=10 if quick else 50)
    sections = []
    for fn in tqdm(SECTIONS, desc="demo", unit="section"):
        sections.append(fn(ctx))
    env = environment()
    body = "".join(f"<section><h2>{html.escape(s.title)}</h2>{s.body}</section>"
                   for s in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>diffgeo demo</title>"
            f"<style>{_CSS}</style></head><body><h1>diffgeo demo</h1>"
            f"<p class='note'>model {html.escape(bb.name or str(model))} · "
            f"{'quick run' if quick else 'full run'} · seed {seed} · "
            f"{time.time() - start:.0f} s · diffgeo {env['diffgeo']}, torch {env['torch']}, "
            f"diffusers {env['diffusers']}</p>{body}</body></html>")
    results.save_json("settings.json", {
        "verb": "demo", "options": {"model": str(model) if isinstance(model, (str, Path))
                                    else bb.name, "quick": quick, "seed": seed,
                                    "device": str(bb.device)},
        "model": bb.name or str(model), "quick": quick, "seed": seed,
        "device": str(bb.device), "dtype": str(bb.dtype), "steps": ctx.steps,
        "environment": env})
    results.write("index.html", page)
    return results.path / "index.html"  # where it is once the run commits
