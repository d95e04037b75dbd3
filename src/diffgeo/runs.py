"""File-in, folder-out functions: what each CLI verb does, callable from Python as well.

Each function loads its inputs with the validation of ``diffgeo.io``, runs the method, and writes
a result folder (images, ``settings.json`` with everything needed to reproduce the run, data as
NPZ/CSV), refusing to overwrite unless ``force``. The returned dict is the content of
``settings.json``.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from diffgeo.backbones.base import Backbone


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

