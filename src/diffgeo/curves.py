"""Generation curves (generation-curves paper §3): how fast an image component is generated.

A *generation curve* c(𝒳, v) is the sequence of generation rates r_t(X_t, v) along a DDIM path
𝒳 = ⟨X_t⟩ for a fixed direction v in state space (a pixel, a patch, a row...). This module
implements the differentiable definition used for editing, r_t = ‖D h_t(X_t)[v]‖ with h the U-Net
bottleneck (§4.1), with K directions per timestep in one batched JVP; the tangent-projected
definitions (Eq. 6, Fig. 5) build on ``diffgeo.tangent``.

Pixel → state rule: for pixel models a pixel (r, c) is the state cell (r, c). For latent models
the image pixel (r, c) falls in latent cell (r // f, c // f), f = image size / state size (the VAE's
downsampling factor); the direction is that cell, over all latent channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.ddim import Trajectory
from diffgeo.errors import InputError
from diffgeo.jacobian import batched_jvp

DEFINITIONS = ("h",)


@dataclass
class GenerationCurves:
    """Rates of K directions over the timesteps of one path: ``values`` has shape (K, N)."""

    timesteps: list[int]
    values: torch.Tensor
    definition: str
    labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def fluctuation(self, window: int = 5, t_min: int = 200) -> torch.Tensor:
        return fluctuation(self.values, self.timesteps, window, t_min)


def state_cell(backbone: Backbone, pixel: Sequence[int]) -> tuple[int, int]:
    """The state cell an image pixel (row, col) falls in (see the module docstring)."""
    H, W = backbone.image_size
    r, c = int(pixel[0]), int(pixel[1])
    if not (0 <= r < H and 0 <= c < W):
        raise InputError(f"pixel ({r}, {c}) is outside the {H}x{W} image")
    h, w = backbone.state_shape[-2:]
    return r * h // H, c * w // W


def pixel_direction(backbone: Backbone, pixel: Sequence[int],
                    channel: int | None = None) -> torch.Tensor:
    """Unit vector e_ij in state space: one cell, all channels (or one), shape state_shape."""
    r, c = state_cell(backbone, pixel)
    C = backbone.state_shape[0]
    v = torch.zeros(backbone.state_shape, dtype=backbone.dtype, device=backbone.device)
    if channel is None:
        v[:, r, c] = 1.0 / C**0.5
    else:
        if not 0 <= channel < C:
            raise InputError(f"channel must lie in 0..{C - 1}, got {channel}")
        v[channel, r, c] = 1.0
    return v


def generation_curves(backbone: Backbone, trajectory: Trajectory, directions: torch.Tensor,
                      definition: str = "h", cond: Conditioning | None = None,
                      labels: Sequence[str] | None = None, chunk: int = 16,
                      t_min: int | None = None, progress: bool = False) -> GenerationCurves:
    """Curves of K ``directions`` (K, *state_shape) along a batch-1 ``trajectory``."""
    if definition not in DEFINITIONS:
        raise InputError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
    if directions.ndim == len(backbone.state_shape):
        directions = directions[None]
    if tuple(directions.shape[1:]) != tuple(backbone.state_shape):
        raise InputError(f"directions must have shape (K, {backbone.state_shape}), "
                         f"got {tuple(directions.shape)}")
    if trajectory.first.shape[0] != 1:
        raise InputError("generation_curves takes a trajectory of one image (batch 1)")
    steps = [(t, x) for t, x in zip(trajectory.timesteps, trajectory.states, strict=True)
             if t is not None and (t_min is None or t >= t_min)]
    steps.sort(key=lambda p: p[0])
    V = directions.to(backbone.device, backbone.dtype)[:, None]  # (K, 1, *state)
    values = []
    for t, x in tqdm(steps, desc="curves", disable=not progress, leave=False):
        jv = batched_jvp(backbone, x, V, t, cond, output="h", chunk=chunk)
        values.append(jv.flatten(1).norm(dim=1))
    vals = torch.stack(values, dim=1).detach().float().cpu()
    return GenerationCurves([t for t, _ in steps], vals, definition,
                            list(labels) if labels else [], {"chunk": chunk, "t_min": t_min})


def fluctuation(values: torch.Tensor, timesteps: Sequence[int], window: int = 5,
                t_min: int = 200) -> torch.Tensor:
    """Mean sliding-window variance of each curve over t > t_min (paper §3.2, App. C.1).

    ``values`` is (N,) or (K, N) over ascending ``timesteps``; windows lie entirely in t > t_min.
    """
    v = values if values.ndim == 2 else values[None]
    ts = torch.as_tensor(list(timesteps))
    if v.shape[1] != len(ts):
        raise InputError(f"values have {v.shape[1]} timesteps, timesteps has {len(ts)}")
    if window < 2:
        raise InputError(f"window must be >= 2, got {window}")
    keep = v[:, ts > t_min]
    if keep.shape[1] < window:
        raise InputError(f"only {keep.shape[1]} timesteps lie above t_min={t_min}: fewer than "
                         f"the window ({window})")
    windows = keep.unfold(1, window, 1)  # (K, n_windows, window)
    out = windows.var(dim=-1, unbiased=False).mean(dim=-1)
    return out if values.ndim == 2 else out[0]


def salient_and_background_pixels(mask: np.ndarray, rng: np.random.Generator,
                                  margin: int = 3) -> tuple[tuple[int, int], tuple[int, int]]:
    """One pixel well inside the object and one at least ``margin`` pixels away from it.

    The paper samples one pixel of maximal and one of minimal saliency; with an object mask as the
    saliency ground truth, 'maximal' is the object interior (the mask eroded once, so the pixel is
    not on an anti-aliased edge) and 'minimal' the background away from the object.
    """
    m = mask > 0.5
    if not m.any() or m.all():
        raise InputError("the mask must contain both object and background pixels")
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    obj = np.argwhere(inner if inner.any() else m)
    pts = np.argwhere(m)
    grid = np.argwhere(np.ones_like(m))
    d = np.sqrt(((grid[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).min(1).reshape(m.shape)
    far = np.argwhere(d >= margin)
    if len(far) == 0:
        far = np.argwhere(d == d.max())
    o = obj[rng.integers(len(obj))]
    b = far[rng.integers(len(far))]
    return (int(o[0]), int(o[1])), (int(b[0]), int(b[1]))
