"""Inpainting baselines for object removal: repainting from noise, and a mean-colour fill.

Curve matching (``tasks.remove``) is judged against these two, run by the same code on the same
masks. ``repaint`` regenerates the masked region from pure noise with the model while the known
region is re-noised from the input at every level (RePaint, Lugmayr et al. 2022, on the DDIM
grid; ``resample`` > 1 adds its jump-back harmonisation), so the model fills the hole with what it
finds plausible given the surroundings. ``mean_fill`` paints the hole with the mean colour of
the pixels outside it — the trivial answer a learned method must beat on textured backgrounds.
"""

from __future__ import annotations

from typing import Any

import torch

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.errors import InputError
from diffgeo.io.regions import as_mask
from diffgeo.sampling import Grid, Guidance, Step, sample


def _hole(image: torch.Tensor, mask: Any) -> torch.Tensor:
    """The hole as image pixels (mask > 0.5, the regions module's rule for which pixels),
    (1, 1, H, W) in the image's dtype and device; empty or whole-image holes are refused."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"image must have shape (1, C, H, W), got {tuple(image.shape)}")
    m = (as_mask(mask, tuple(image.shape[-2:])) > 0.5).to(image.dtype)
    if not bool(m.any()):
        raise InputError("mask is empty: mark the pixels to fill with 1")
    if bool(m.all()):
        raise InputError("mask covers the whole image: nothing is left to fill it from")
    return m[None, None].to(image.device)


def mean_fill(image: torch.Tensor, mask: Any) -> torch.Tensor:
    """The image with the masked pixels set to the per-channel mean of the unmasked ones."""
    m = _hole(image, mask)
    keep = 1 - m
    mean = (image * keep).sum(dim=(-2, -1), keepdim=True) / keep.sum()
    return image * keep + mean * m


def repaint(backbone: Backbone, image: torch.Tensor, mask: Any, *,
            grid: Grid | int | None = None, resample: int = 1, clip_x0: bool | None = None,
            generator: torch.Generator | None = None, cond: Conditioning | None = None,
            guidance: Guidance | None = None, progress: bool = False) -> torch.Tensor:
    """Regenerate the masked region of ``image`` ((1, C, H, W) in [-1, 1]) from noise.

    Starts from N(0, I) at the top of ``grid`` (a Grid or a number of steps on the model's
    grid). At each step the unknown part
    takes a DDIM step (η = 0) of the current state and the known part is the input noised to the
    next level with fresh noise; ``resample`` > 1 re-noises the merged state back one level and
    repeats the step (RePaint's resampling, jump length 1). Every draw comes from ``generator``.
    ``clip_x0`` (default: on for pixel models, whose data lie in [-1, 1]; never for latents)
    clamps x̂0 as pixel DDPMs are sampled from noise. Outside the mask the result is the input
    exactly (the repainted state is pasted back in image space, so a latent model's decoder
    cannot alter unmasked pixels either).
    """
    if generator is None:
        raise InputError("repaint draws noise: pass generator=torch.Generator().manual_seed(N)")
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise InputError(f"resample must be an integer >= 1, got {resample!r}")
    if clip_x0 is None:
        clip_x0 = backbone.kind == "pixel"
    m_img = _hole(image, mask)
    dev, dt = backbone.device, backbone.dtype
    with torch.no_grad():
        x0 = backbone.to_state(image.to(dev, dt))
    m = backbone.state_region(m_img[0, 0])
    g = Grid.resolve(backbone, grid)

    def noise() -> torch.Tensor:
        return torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                           device=generator.device).to(dev)

    def merge(step: Step) -> torch.Tensor:
        known = x0 if step.t_to is None else g.noised(x0, noise(), step.t_to)
        merged = m * step.x_to + (1 - m) * known
        for _ in range(resample - 1):
            # q(x_from | x_to): back up one level with fresh noise and step again
            unknown = step.redo(g.renoised(merged, noise(), step.t_from, step.t_to))
            known = x0 if step.t_to is None else g.noised(x0, noise(), step.t_to)
            merged = m * unknown + (1 - m) * known
        return merged

    with torch.no_grad():
        x = sample(backbone, noise(), g, cond=cond, guidance=guidance, clip_x0=clip_x0,
                   on_step=merge, record=False, progress=progress, desc="repaint").last
        out = backbone.to_image(x).clamp(-1, 1).to(image.device, image.dtype)
    return image * (1 - m_img) + out * m_img
