"""File-in, folder-out functions: what each CLI verb does, callable from Python as well.

Each function loads its inputs with the validation of ``diffgeo.io``, runs the method, and writes
a result folder (images, ``settings.json`` with everything needed to reproduce the run, data as
NPZ/CSV), refusing to overwrite unless ``force``. The returned dict is the content of
``settings.json``.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffgeo.backbones.base import Backbone
from diffgeo.errors import InputError


def environment() -> dict[str, str]:
    import diffusers

    import diffgeo

    return {"diffgeo": diffgeo.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version()}


def as_backbone(model: str | Backbone, device: str = "cpu", dtype: str = "float32") -> Backbone:
    if isinstance(model, Backbone):
        return model
    from diffgeo.backbones import load_backbone

    return load_backbone(model, device=device, dtype=dtype)


def evenly_spaced(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    idx = [round(i * (len(items) - 1) / (n - 1)) for i in range(n)]
    return [items[i] for i in idx]


INVERT_FILES = ("input.png", "reconstruction.png", "trajectory.png", "trajectory.npz",
                "settings.json")


def invert_image(image: str | Path, *, model: str | Backbone = "default", t: int = 700,
                 num_steps: int = 50, exact: bool = False, tol: float = 1e-5,
                 max_iter: int = 50, prompt: str = "", fit: str | None = None,
                 out: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                 seed: int = 0, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Invert an image file to X_t, regenerate it, and (with ``out``) write the result folder:

    input.png (as fitted to the model), reconstruction.png, trajectory.png (states along the
    inversion, decoded), trajectory.npz (states and timesteps; -1 marks the clean level),
    settings.json (arguments, model summary, PSNR, exact-mode residuals, versions).
    """
    from diffgeo import ddim
    from diffgeo.io import ResultDir, load_image, psnr

    bb = as_backbone(model, device, dtype)
    results = ResultDir(out, force=force, protect=[Path(image)]) if out is not None else None
    if results is not None:  # refuse before computing, not after
        for name in INVERT_FILES:
            results.path_for(name)
    x, fit_info = load_image(image, size=bb.image_size, fit=fit)
    x = x.to(device=bb.device, dtype=bb.dtype)
    cond = bb.condition(prompt) if (prompt or bb.conditional) else None
    with torch.no_grad():
        state = bb.to_state(x)
        inv = ddim.invert(bb, state, t, num_steps, cond, exact=exact, tol=tol,
                          max_iter=max_iter, progress=progress)
        gen = ddim.generate(bb, inv.last, t, num_steps, cond, progress=progress)
        recon = bb.to_image(gen.last)
        ceiling = bb.to_image(state) if bb.kind == "latent" else x
    settings: dict[str, Any] = {
        "verb": "invert", "image": str(image), "model": bb.name or str(model), "t": t,
        "num_steps": num_steps, "exact": exact, "tol": tol, "max_iter": max_iter,
        "prompt": prompt, "fit": fit_info.to_dict(), "device": device, "dtype": dtype,
        "seed": seed, "model_summary": bb.summary().__dict__,
        "psnr": psnr(recon.float().cpu(), x.float().cpu()),
        "psnr_autoencoder_ceiling": psnr(ceiling.float().cpu(), x.float().cpu()),
        "state_max_error": float((gen.last - state).abs().max()),
        "exact_residuals": inv.residuals, "exact_iterations": inv.iterations,
        "grid": inv.grid(), "environment": environment(),
    }
    if results is not None:
        with torch.no_grad():
            shown = evenly_spaced(list(zip(inv.timesteps, inv.states, strict=True)), 6)
            strip = [bb.to_image(s).clamp(-1, 1).float().cpu() for _, s in shown]
        results.save_image("input.png", x.float().cpu())
        results.save_image("reconstruction.png", recon.float().cpu())
        results.save_strip("trajectory.png", strip)
        results.save_npz("trajectory.npz",
                         timesteps=torch.tensor([-1 if s is None else s for s in inv.timesteps]),
                         states=inv.stacked().float().cpu())
        results.save_json("settings.json", settings)
    return settings



def _prepare_image(bb: Backbone, image: str | Path, fit: str | None, prompt: str):
    from diffgeo.io import load_image

    x, fit_info = load_image(image, size=bb.image_size, fit=fit)
    x = x.to(device=bb.device, dtype=bb.dtype)
    cond = bb.condition(prompt) if (prompt or bb.conditional) else None
    return x, fit_info, cond


def _top_of_grid(bb: Backbone, num_steps: int, t: int | None) -> int:
    from diffgeo import ddim

    return ddim.ddim_grid(bb.num_train_timesteps, num_steps)[-1] if t is None else t


def curves_for_image(image: str | Path, *, model: str | Backbone = "default",
                     pixels: Sequence[Sequence[int]] = (), mask: str | Path | None = None,
                     box: Sequence[int] | None = None, rows: Sequence[int] = (),
                     cols: Sequence[int] = (), definition: str = "h", t: int | None = None,
                     num_steps: int = 50, k: int = 3, channel: int | None = None,
                     window: int = 5, t_min: int = 200, prompt: str = "",
                     perceptual: str | None = None, perceptual_mode: str = "multiply",
                     fit: str | None = None, out: str | Path | None = None,
                     device: str = "cpu", dtype: str = "float32", seed: int = 0,
                     force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Generation curves of image components along the DDIM inversion path of an image file.

    Components: pixels (row, col) and rows/columns in *input-image* pixels (mapped through the
    fit), a mask file or a box (each one region, Eq. 7 average). ``definition`` is one of
    exact, eps, h-proj, h, or ``all`` (the four side by side, Fig. 5). Writes curves.png,
    curves.csv (one column per component), curves.npz, settings.json (with each component's
    fluctuation) and, for ``all``, definitions.png. With ``perceptual`` (a DINO model id or
    folder) the region's perceptual-based curve (App. C.2) is computed too and drawn against
    ours (perceptual.png, Fig. 4); it needs a mask or box.
    """
    from diffgeo import curves as C
    from diffgeo import ddim
    from diffgeo.io import ResultDir, box_mask, fit_tensor, load_mask, to_uint8
    from diffgeo.plots import curves_figure, definitions_figure

    bb = as_backbone(model, device, dtype)
    defs = list(C.DEFINITIONS) if definition == "all" else [definition]
    for d in defs:
        C._check_definition(d)
    results = ResultDir(out, force=force, protect=[Path(image)]) if out is not None else None
    names = ["curves.png", "curves.csv", "curves.npz", "settings.json"]
    if definition == "all":
        names.append("definitions.png")
    if perceptual is not None:
        if mask is None and box is None:
            raise InputError("the perceptual curve is object-wise: give --mask or --box")
        names.append("perceptual.png")
    if results is not None:
        for name in names:
            results.path_for(name)
    x, fit_info, cond = _prepare_image(bb, image, fit, prompt)
    comps: list[C.Component] = []
    for p in pixels:
        comps.append(C.pixel_component(bb, fit_info.map_pixel(p, "--pixel"), channel))
    # Rows and columns are mapped through the image's centre line: the crop may cut away the
    # edges, never the centre.
    for r in rows:
        rr, _ = fit_info.map_pixel((r, fit_info.in_size[1] // 2), "--row")
        comps.append(C.row_component(bb, rr, channel))
    for c in cols:
        _, cc = fit_info.map_pixel((fit_info.in_size[0] // 2, c), "--col")
        comps.append(C.column_component(bb, cc, channel))
    if mask is not None:
        m = load_mask(mask, bb.image_size, fit_info, input_size=fit_info.in_size)
        comps.append(C.mask_component(bb, m[0, 0], "mask", channel))
    if box is not None:
        m = box_mask(box, fit_info.in_size)
        m, _ = fit_tensor(m, bb.image_size, fit_info, is_mask=True)
        comps.append(C.mask_component(bb, m[0, 0], "box", channel))
    if not comps:
        raise InputError("give at least one component: --pixel, --row, --col, --mask or --box")
    t_top = _top_of_grid(bb, num_steps, t)
    with torch.no_grad():
        state = bb.to_state(x)
    inv = ddim.invert(bb, state, t_top, num_steps, cond, progress=progress)
    bases = None
    if any(d in C.PROJECTED for d in defs):  # one set of bases serves every definition
        from diffgeo.tangent import tangent_bases_along

        bases = tangent_bases_along(bb, inv, k=k, cond=cond, oversample=4, progress=progress)
    by_def = {d: C.generation_curves(bb, inv, comps, d, cond, k=k, bases=bases,
                                     progress=progress) for d in defs}
    main = by_def[defs[0]]
    flucts = {d: [float(v) for v in c.fluctuation(window, min(t_min, c.timesteps[-1] - 1))]
              for d, c in by_def.items()}
    percep = None
    if perceptual is not None:
        from diffgeo.perceptual import DinoFeatures, perceptual_curve

        region = next(i for i, c in enumerate(comps) if c.label in ("mask", "box"))
        region_mask = _component_mask(bb, comps[region])
        percep = perceptual_curve(bb, inv, x, region_mask, DinoFeatures.load(perceptual, device),
                                  cond, perceptual_mode)
    settings: dict[str, Any] = {
        "verb": "curves", "image": str(image), "model": bb.name or str(model),
        "definition": definition, "t": t_top, "num_steps": num_steps, "k": k,
        "channel": channel, "window": window, "t_min": t_min, "prompt": prompt,
        "fit": fit_info.to_dict(), "components": [c.label for c in comps],
        "fluctuation": {d: dict(zip(main.labels, f, strict=True)) for d, f in flucts.items()},
        "device": device, "dtype": dtype, "seed": seed, "environment": environment(),
    }
    if results is not None:
        img = to_uint8(x.float().cpu())
        marks = [c.pixels for c in comps]
        curves_figure(img, main.timesteps, main.values.numpy(), main.labels, marks,
                      results.path_for("curves.png"),
                      f"generation curves ({defs[0]}), inversion to t={t_top}")
        rows_out = []
        for j, tt in enumerate(main.timesteps):
            row = [tt]
            for d in defs:
                row += [float(v) for v in by_def[d].values[:, j]]
            rows_out.append(row)
        header = ["t"] + [f"{d}:{lab}" for d in defs for lab in main.labels]
        results.save_csv("curves.csv", header, rows_out)
        results.save_npz("curves.npz", timesteps=torch.tensor(main.timesteps),
                         **{f"values_{d}": c.values for d, c in by_def.items()})
        if percep is not None:
            from diffgeo.plots import line_plot, normalise01

            line_plot(main.timesteps, {
                f"ours ({defs[0]})": normalise01(main.values[region].numpy()),
                "perceptual (DINO)": normalise01(percep.rate.numpy()),
            }, results.path_for("perceptual.png"), "t", "normalised rate",
                f"{comps[region].label}: perceptual-based vs generation curve", invert_x=True)
            settings["perceptual"] = {"model": perceptual, "mode": perceptual_mode,
                                      "distance": percep.distance.tolist(),
                                      "rate": percep.rate.tolist()}
        if definition == "all":
            definitions_figure({d: c.timesteps for d, c in by_def.items()},
                               {d: c.values[0].numpy() for d, c in by_def.items()},
                               results.path_for("definitions.png"),
                               f"{main.labels[0]}: the four definitions (normalised)")
        results.save_json("settings.json", settings)
    settings["curves"] = by_def
    return settings


def _component_mask(bb: Backbone, comp) -> torch.Tensor:
    """The image-resolution mask (H, W) of the state cells a component covers."""
    from diffgeo.curves import state_cell

    H, W = bb.image_size
    h, w = bb.state_shape[-2:]
    m = torch.zeros(H, W)
    for p in comp.pixels:
        r, c = state_cell(bb, p)
        m[r * H // h:(r + 1) * H // h, c * W // w:(c + 1) * W // w] = 1.0
    return m


def saliency_for_image(image: str | Path, *, model: str | Backbone = "default",
                       definition: str = "h", estimator: str | None = None, probes: int = 64,
                       t: int | None = None, num_steps: int = 50, k: int = 3,
                       window: int = 5, t_min: int = 200, prompt: str = "",
                       fit: str | None = None, out: str | Path | None = None,
                       device: str = "cpu", dtype: str = "float32", seed: int = 0,
                       force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Rate maps [T × h × w] along the inversion path and the saliency (fluctuation) map.

    Writes saliency.png (image, map, overlay), rate_maps.npz (timesteps, maps, saliency) and
    settings.json (estimator and its per-cell relative standard deviation).
    """
    from diffgeo import ddim
    from diffgeo.io import ResultDir, to_uint8
    from diffgeo.maps import rate_maps_along, upsample_to_image
    from diffgeo.plots import heatmap_figure

    bb = as_backbone(model, device, dtype)
    results = ResultDir(out, force=force, protect=[Path(image)]) if out is not None else None
    if results is not None:
        for name in ("saliency.png", "rate_maps.npz", "settings.json"):
            results.path_for(name)
    x, fit_info, cond = _prepare_image(bb, image, fit, prompt)
    t_top = _top_of_grid(bb, num_steps, t)
    with torch.no_grad():
        state = bb.to_state(x)
    inv = ddim.invert(bb, state, t_top, num_steps, cond, progress=progress)
    maps = rate_maps_along(bb, inv, definition, estimator, cond, probes=probes, seed=seed, k=k,
                           progress=progress)
    sal = maps.saliency(window, min(t_min, maps.timesteps[-1] - 1))
    settings: dict[str, Any] = {
        "verb": "saliency-map", "image": str(image), "model": bb.name or str(model),
        "definition": definition, "estimator": maps.estimator,
        "relative_std_per_cell": maps.relative_std, "probes": probes, "t": t_top,
        "num_steps": num_steps, "k": k, "window": window, "t_min": t_min, "prompt": prompt,
        "fit": fit_info.to_dict(), "device": device, "dtype": dtype, "seed": seed,
        "environment": environment(),
    }
    if results is not None:
        heatmap_figure(to_uint8(x.float().cpu()), upsample_to_image(sal, bb.image_size).numpy(),
                       results.path_for("saliency.png"),
                       f"saliency = curve fluctuation ({definition}, {maps.estimator})",
                       label="fluctuation")
        results.save_npz("rate_maps.npz", timesteps=torch.tensor(maps.timesteps),
                         maps=maps.values, saliency=sal)
        results.save_json("settings.json", settings)
    settings["maps"] = maps
    settings["saliency"] = sal
    return settings


def _region_mask(bb: Backbone, fit_info, mask: str | Path | None,
                 box: Sequence[int] | None) -> torch.Tensor:
    """A (1, 1, H, W) region at model resolution from --mask or --box (input-image pixels)."""
    from diffgeo.io import box_mask, fit_tensor, load_mask

    if (mask is None) == (box is None):
        raise InputError("give exactly one region: --mask FILE or --box r0,c0,r1,c1")
    if mask is not None:
        return load_mask(mask, bb.image_size, fit_info, input_size=fit_info.in_size)
    m, _ = fit_tensor(box_mask(box, fit_info.in_size), bb.image_size, fit_info, is_mask=True)
    return m


def _strip_with_locality(results, name: str, edit, region: torch.Tensor) -> list[dict]:
    results.save_strip(name, [im.float().cpu() for im in edit.strip()])
    return [dict(strength=a, **loc.__dict__)
            for a, loc in zip(edit.strengths, edit.locality(region.cpu()), strict=True)]


def directions_for_image(image: str | Path, *, model: str | Backbone = "default",
                         mask: str | Path | None = None, box: Sequence[int] | None = None,
                         t: int = 500, num_steps: int = 40, k: int = 3,
                         project: str = "leading", preview: Sequence[float] = (-30, 0, 30),
                         prompt: str = "", fit: str | None = None,
                         out: str | Path | None = None, device: str = "cpu",
                         dtype: str = "float32", seed: int = 0, force: bool = False,
                         progress: bool = False) -> dict[str, Any]:
    """RBE: discover h-space directions for a region of an image file and preview each one.

    Writes directions/ (safetensors + JSON, for ``apply_for_image``), direction-I.png (the
    reconstruction, then one edit per preview strength) and settings.json with singular values
    and each preview's change inside vs outside the region.
    """
    from diffgeo.editing.rbe import apply_direction, discover_directions
    from diffgeo.io import ResultDir

    bb = as_backbone(model, device, dtype)
    results = ResultDir(out, force=force, protect=[Path(image)]) if out is not None else None
    if results is not None:
        results.path_for("settings.json")
        for i in range(k):
            results.path_for(f"direction-{i}.png")
    x, fit_info, cond = _prepare_image(bb, image, fit, prompt)
    region = _region_mask(bb, fit_info, mask, box)
    with torch.no_grad():
        state = bb.to_state(x)
    dirs = discover_directions(bb, state, region[0, 0], t=t, num_steps=num_steps, k=k,
                               project_against=project, cond=cond,
                               generator=torch.Generator().manual_seed(seed), progress=progress)
    settings: dict[str, Any] = {
        "verb": "directions", "image": str(image), "model": bb.name or str(model), "t": t,
        "num_steps": num_steps, "k": k, "project": project, "preview": list(preview),
        "prompt": prompt, "fit": fit_info.to_dict(), "device": device, "dtype": dtype,
        "seed": seed, "singular_values": dirs.singular_values.tolist(),
        "discovery": dirs.settings, "environment": environment(),
    }
    if results is not None:
        dirs.save(results.path / "directions", force=force)
        previews = []
        for i in range(dirs.k):
            edit = apply_direction(bb, state, dirs, i, list(preview), cond=cond,
                                   progress=progress)
            previews.append(_strip_with_locality(results, f"direction-{i}.png", edit, region))
        settings["previews"] = previews
        results.save_json("settings.json", settings)
    settings["directions"] = dirs
    return settings


def apply_for_image(image: str | Path, *, directions: str | Path,
                    model: str | Backbone = "default", index: int = 0,
                    strengths: Sequence[float] = (-30, 0, 30), mode: str = "x0",
                    window: tuple[int, int] | None = None, eta: float = 0.0,
                    mask: str | Path | None = None, rediscover: bool = False,
                    prompt: str = "", fit: str | None = None,
                    out: str | Path | None = None, device: str = "cpu",
                    dtype: str = "float32", seed: int = 0, force: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """RBE: edit an image along a saved direction at several strengths (Asyrp-style).

    Writes result.png (reconstruction, then one image per strength), edit-J.png per strength,
    and settings.json with each edit's change inside vs outside the region (the discovery mask,
    or --mask).
    """
    from diffgeo.editing.rbe import Directions, apply_direction
    from diffgeo.io import ResultDir, load_mask

    bb = as_backbone(model, device, dtype)
    dirs = Directions.load(directions)
    results = ResultDir(out, force=force, protect=[Path(image)]) if out is not None else None
    if results is not None:
        for name in ("result.png", "settings.json"):
            results.path_for(name)
    x, fit_info, cond = _prepare_image(bb, image, fit, prompt)
    with torch.no_grad():
        state = bb.to_state(x)
    gen = torch.Generator().manual_seed(seed) if eta > 0 else None
    edit = apply_direction(bb, state, dirs, index, list(strengths), window=window, mode=mode,
                           eta=eta, generator=gen, cond=cond, rediscover=rediscover,
                           progress=progress)
    if mask is not None:
        region = load_mask(mask, bb.image_size, fit_info, input_size=fit_info.in_size)
    elif dirs.mask is not None:
        region = torch.nn.functional.interpolate(dirs.mask[None, None].float(),
                                                 size=tuple(bb.image_size), mode="nearest")
    else:
        region = None
    settings: dict[str, Any] = {
        "verb": "apply", "image": str(image), "directions": str(directions),
        "model": bb.name or str(model), "index": index, "strengths": list(strengths),
        "mode": mode, "window": list(edit.window), "eta": eta, "prompt": prompt,
        "fit": fit_info.to_dict(), "device": device, "dtype": dtype, "seed": seed,
        "edited_timesteps": edit.edited_timesteps, "rediscover": rediscover,
        "rediscover_alignment": edit.settings.get("rediscover_alignment", []),
        "environment": environment(),
    }
    if results is not None:
        if region is not None:
            settings["locality"] = _strip_with_locality(results, "result.png", edit, region)
        else:
            results.save_strip("result.png", [im.float().cpu() for im in edit.strip()])
        for j, im in enumerate(edit.images):
            results.save_image(f"edit-{j}.png", im[None].float().cpu())
        results.save_json("settings.json", settings)
    settings["edit"] = edit
    return settings


EXEMPLAR_FILES = ("input.png", "result.png", "composite.png", "maps.png", "masks.png",
                  "settings.json")


def _load_edit_map(bb: Backbone, path: str | Path, fit_info, k: int) -> torch.Tensor:
    """An edit map file drawn on the source image, fitted like it (padding keeps the source)."""
    from diffgeo.io import _mask_from_file, fit_tensor

    m = _mask_from_file(path)
    got = (int(m.shape[0]), int(m.shape[1]))
    if got != tuple(fit_info.in_size):
        raise InputError(f"--map {k + 1} ({path}) is {got[0]}x{got[1]} (HxW) but the source "
                         f"image is {fit_info.in_size[0]}x{fit_info.in_size[1]}: draw the map "
                         "on the source (same size)")
    x = torch.from_numpy(m.astype("float32"))[None, None]
    x, _ = fit_tensor(x, bb.image_size, fit_info, is_mask=True, pad_value=1.0)
    return x.clamp(0, 1)


def _parse_place(text: str, k: int) -> tuple[tuple[int, int], float]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        r, c = int(parts[0]), int(parts[1])
        s = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise InputError(f"--place {k + 1} must be row,col or row,col,scale, got {text!r}"
                         ) from None
    return (r, c), s


def exemplar_edit(source: str | Path, *, exemplars: Sequence[str | Path],
                  maps: Sequence[str | Path], model: str | Backbone = "default",
                  strength: float = 0.8, num_steps: int = 50, threshold: str = "linear",
                  prompt: str = "", guidance_scale: float = 1.0, invert_maps: bool = False,
                  iterative: bool = False, placements: Sequence[str] | None = None,
                  fit: str | None = None, out: str | Path | None = None, device: str = "cpu",
                  dtype: str = "float32", seed: int = 0, force: bool = False,
                  progress: bool = False) -> dict[str, Any]:
    """PIXELS: progressive exemplar editing of SOURCE with one map per exemplar.

    Maps are image files drawn on the source (same size; 1/white = keep source, 0/black = take
    the exemplar; ``invert_maps`` for the opposite), fitted like the source. An exemplar is
    either an image fitted like the source, or (``placements``: one "row,col[,scale]" per
    exemplar) pasted at that offset and scale into a copy of the fitted source. Noise: one draw
    per image from ``torch.Generator().manual_seed(seed)``, source first. ``iterative`` runs one
    exemplar per pass, feeding each output back as the next source.

    Writes input.png, exemplar-K.png, composite.png (the surgical composite in image space:
    what the first step's mask copies), result.png, maps.png (maps as used, state resolution),
    masks.png (the per-step pin mask strip, 1 = source pinned) and settings.json.
    """
    from diffgeo.editing.pixels import pixels_edit, pixels_iterative, place_exemplar
    from diffgeo.io import ResultDir, load_image

    exemplars, maps = list(exemplars), list(maps)
    if not exemplars:
        raise InputError("give at least one --exemplar (with its --map)")
    if len(maps) != len(exemplars):
        raise InputError(f"give one --map per --exemplar: {len(exemplars)} exemplar(s), "
                         f"{len(maps)} map(s)")
    if placements is not None and len(placements) not in (0, len(exemplars)):
        raise InputError(f"give --place once per --exemplar ({len(exemplars)}) or not at all, "
                         f"got {len(placements)}")
    bb = as_backbone(model, device, dtype)
    inputs = [Path(source), *map(Path, exemplars), *map(Path, maps)]
    results = ResultDir(out, force=force, protect=inputs) if out is not None else None
    if results is not None:
        for name in (*EXEMPLAR_FILES, *(f"exemplar-{k + 1}.png" for k in range(len(exemplars)))):
            results.path_for(name)
    x, fit_info = load_image(source, size=bb.image_size, fit=fit)
    x = x.to(device=bb.device, dtype=bb.dtype)
    ex_images = []
    for k, e in enumerate(exemplars):
        if placements:
            native, _ = load_image(e)
            offset, scale = _parse_place(placements[k], k)
            placed, _ = place_exemplar(native.to(device=bb.device, dtype=bb.dtype), x,
                                       offset=offset, scale=scale)
            ex_images.append(placed)
        else:
            img, _ = load_image(e, size=bb.image_size, fit=fit)
            ex_images.append(img.to(device=bb.device, dtype=bb.dtype))
    mus = [_load_edit_map(bb, m, fit_info, k) for k, m in enumerate(maps)]
    cond = bb.condition(prompt) if (prompt or bb.conditional) else None
    uncond = bb.condition("") if guidance_scale > 1 and bb.conditional else None
    gen = torch.Generator().manual_seed(seed)
    kw = dict(strength=strength, num_steps=num_steps, threshold=threshold, cond=cond,
              guidance_scale=guidance_scale, uncond=uncond, invert_maps=invert_maps)
    with torch.no_grad():
        src_state = bb.to_state(x)
        ex_states = [bb.to_state(e) for e in ex_images]
        if iterative:
            passes = pixels_iterative(bb, src_state, ex_states, mus, generator=gen, **kw)
        else:
            passes = [pixels_edit(bb, src_state, ex_states, mus, generator=gen, **kw)]
        result = bb.to_image(passes[-1].state).clamp(-1, 1)
    # the image-space composite of step 0 (maps at image resolution, > threshold(0))
    thr0 = float(passes[0].thresholds[0])
    composite = x
    for e, m in zip(ex_images, mus, strict=True):
        mm = (1 - m) if invert_maps else m
        keep = (mm.to(x) > thr0).to(x)
        composite = composite * keep + e * (1 - keep)
    settings: dict[str, Any] = {
        "verb": "exemplar", "source": str(source), "exemplars": [str(e) for e in exemplars],
        "maps": [str(m) for m in maps], "model": bb.name or str(model), "strength": strength,
        "num_steps": num_steps, "threshold": threshold, "prompt": prompt,
        "guidance_scale": guidance_scale, "invert_maps": invert_maps, "iterative": iterative,
        "placements": list(placements or []), "fit": fit_info.to_dict(), "device": device,
        "dtype": dtype, "seed": seed, "t_start": passes[0].settings["t_start"],
        "executed_timesteps": passes[0].timesteps,
        "thresholds": [float(v) for v in passes[0].thresholds],
        "method": passes[0].settings, "environment": environment(),
    }
    if results is not None:
        size = tuple(bb.image_size)

        def up(m: torch.Tensor) -> torch.Tensor:
            m = torch.nn.functional.interpolate(m.float().cpu(), size=size, mode="nearest")
            return (m * 2 - 1).expand(-1, 3, -1, -1)

        results.save_image("input.png", x.float().cpu())
        for k, e in enumerate(ex_images):
            results.save_image(f"exemplar-{k + 1}.png", e.float().cpu())
        results.save_image("composite.png", composite.float().cpu())
        results.save_image("result.png", result.float().cpu())
        used = torch.cat([p.maps for p in passes])
        results.save_strip("maps.png", [up(m[None]) for m in used])
        shown = evenly_spaced(list(passes[-1].masks), 10)
        results.save_strip("masks.png", [up(m[None]) for m in shown])
        results.save_json("settings.json", settings)
    settings["result"] = result
    settings["passes"] = passes
    return settings


CURVE_TASKS = ("transfer", "remove", "saliency", "blend")


def curve_edit(task: str, image: str | Path, *, model: str | Backbone = "default",
               mask: str | Path | None = None, box: Sequence[int] | None = None,
               reference: Sequence[int] | None = None, direction: str = "decrease",
               iterations: int | None = None, t: int = 700, num_steps: int = 50,
               lr: float = 0.02, mode: str = "fast", refresh_every: int = 50,
               refresh_drift: float | None = None, pixels_per_iteration: int | None = None,
               match_outside_stats: bool = False,
               lambda1: float = 50.0, feature_weight: float = 1.0,
               blend_every: int = 70, t_blend: int = 500, localized: bool = True,
               decode_blend: bool = True, snapshot_every: int = 0, prompt: str = "",
               fit: str | None = None,
               out: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
               seed: int = 0, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """A curve-matching task (transfer, remove, saliency, blend) on an image file.

    ``reference`` is a pixel (row, col) in input-image pixels (transfer; optional for remove).
    Writes result.png, strip.png (input, snapshots every ``snapshot_every`` iterations, result),
    curves.png (the region pixel's curve before/after, and the reference's), history.csv and
    settings.json.
    """
    from diffgeo.editing import tasks
    from diffgeo.editing.curve_matching import CurveMatchingConfig
    from diffgeo.io import ResultDir
    from diffgeo.plots import line_plot

    if task not in CURVE_TASKS:
        raise InputError(f"task must be one of {CURVE_TASKS}, got {task!r}")
    bb = as_backbone(model, device, dtype)
    results = ResultDir(out, force=force, protect=[Path(image)]) if out is not None else None
    if results is not None:
        for name in ("input.png", "result.png", "strip.png", "curves.png", "history.csv",
                     "settings.json"):
            results.path_for(name)
    x, fit_info, cond = _prepare_image(bb, image, fit, prompt)
    region = _region_mask(bb, fit_info, mask, box)[0, 0].cpu().numpy()
    ref = None
    if reference is not None:
        ref = fit_info.map_pixel(reference, "--reference")
    defaults = {"saliency": 70, "blend": 100}.get(task, 300)
    cfg = CurveMatchingConfig(t=t, num_steps=num_steps, iterations=iterations or defaults,
                              lr=lr, mode=mode, refresh_every=refresh_every,
                              refresh_drift=refresh_drift, blend_every=blend_every,
                              t_blend=t_blend, localized=localized,
                              decode_blend=decode_blend, snapshot_every=snapshot_every,
                              pixels_per_iteration=pixels_per_iteration,
                              match_outside_stats=match_outside_stats, lambda1=lambda1,
                              feature_weight=feature_weight, seed=seed)
    if task == "transfer":
        if ref is None:
            raise InputError("transfer needs --reference R,C (the pixel whose curve to copy)")
        res = tasks.transfer(bb, x, region, ref, cfg, cond, progress)
    elif task == "remove":
        res = tasks.remove(bb, x, region, ref, cfg, cond, progress)
    elif task == "saliency":
        res = tasks.saliency(bb, x, region, direction, cfg, cond, progress)
    else:
        res = tasks.blend(bb, x, region, cfg, cond, progress)
    settings: dict[str, Any] = {
        "verb": task, "image": str(image), "model": bb.name or str(model),
        "reference": list(reference) if reference else None, "direction": direction,
        "fit": fit_info.to_dict(), "prompt": prompt, "device": device, "dtype": dtype,
        "curve_matching": res.settings, "final_loss": res.losses[-1],
        "mean_loss_last_10": float(sum(res.losses[-10:]) / len(res.losses[-10:])),
        "environment": environment(),
    }
    from diffgeo.editing.rbe import edit_locality

    loc = edit_locality(x.float().cpu(), res.image.float(), torch.from_numpy(region))
    settings["locality"] = {"mse_inside": loc.mse_inside, "mse_outside": loc.mse_outside}
    if results is not None:
        results.save_image("input.png", x.float().cpu())
        results.save_image("result.png", res.image)
        results.save_strip("strip.png", [x.float().cpu(), *[im for _, im in res.snapshots],
                                         res.image])
        series = {"region pixel, before": res.region_curve_before.numpy(),
                  "region pixel, after": res.region_curve_after.numpy()}
        if res.reference_curve is not None:
            series["reference"] = res.reference_curve.numpy()
        line_plot(res.timesteps, series, results.path_for("curves.png"), "t", "‖Dh[e_ij]‖",
                  f"{task}: generation curves before/after", invert_x=True)
        # One row per (pixel, timestep) pair; iteration_loss is what Adam stepped on.
        results.save_csv("history.csv", ["iteration", "pair", "iteration_loss", "loss", "rate",
                                         "t_k", "row", "col", "blended", "drift",
                                         "rewalked"],
                         [[h["iteration"], i, h["loss"], s["loss"], s["rate"], s["t_k"],
                           *s["pixel"], h["blended"], h["drift"], h["rewalked"]]
                          for h in res.history for i, s in enumerate(h["samples"])])
        results.save_json("settings.json", settings)
    settings["result"] = res
    return settings


INPAINT_METHODS = ("repaint", "mean-fill")


def inpaint_image(image: str | Path, *, model: str | Backbone = "default",
                  mask: str | Path | None = None, box: Sequence[int] | None = None,
                  method: str = "repaint", num_steps: int = 50, resample: int = 5,
                  prompt: str = "", fit: str | None = None, out: str | Path | None = None,
                  device: str = "cpu", dtype: str = "float32", seed: int = 0,
                  force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Fill a region by repainting it from noise with the model (RePaint on the DDIM grid) or
    with the mean colour of the rest: the baselines object removal is compared against.

    Writes input.png, result.png, strip.png (input, region, result) and settings.json (with
    the MSE inside / outside the region against the input).
    """
    from diffgeo.editing import mean_fill, repaint
    from diffgeo.editing.rbe import edit_locality
    from diffgeo.io import ResultDir

    if method not in INPAINT_METHODS:
        raise InputError(f"method must be one of {INPAINT_METHODS}, got {method!r}")
    bb = as_backbone(model, device, dtype)
    results = ResultDir(out, force=force, protect=[Path(image)]) if out is not None else None
    if results is not None:
        for name in ("input.png", "result.png", "strip.png", "settings.json"):
            results.path_for(name)
    x, fit_info, cond = _prepare_image(bb, image, fit, prompt)
    region = _region_mask(bb, fit_info, mask, box)[0, 0].cpu()
    with torch.no_grad():
        if method == "repaint":
            gen = torch.Generator().manual_seed(seed)
            result = repaint(bb, x, region.numpy(), num_steps=num_steps, resample=resample,
                             generator=gen, cond=cond, progress=progress)
        else:
            result = mean_fill(x, region.numpy())
    result = result.float().cpu()
    loc = edit_locality(x.float().cpu(), result, region)
    settings: dict[str, Any] = {
        "verb": "inpaint", "image": str(image), "model": bb.name or str(model),
        "method": method, "num_steps": num_steps, "resample": resample, "seed": seed,
        "fit": fit_info.to_dict(), "prompt": prompt, "device": device, "dtype": dtype,
        "region_pixels": int((region > 0.5).sum()),
        "locality": {"mse_inside": loc.mse_inside, "mse_outside": loc.mse_outside},
        "environment": environment(),
    }
    if results is not None:
        results.save_image("input.png", x.float().cpu())
        results.save_image("result.png", result)
        shown = region[None, None].expand_as(result) * 2 - 1
        results.save_strip("strip.png", [x.float().cpu(), shown, result])
        results.save_json("settings.json", settings)
    settings["result"] = result
    return settings
