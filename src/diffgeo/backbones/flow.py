"""Rectified-flow transformers (SD3/SD3.5, FLUX.1): what the families share.

Calling convention (on top of :mod:`diffgeo.backbones.base`):

- ``t`` is a flow *model time* τ = σ·T (T = ``num_train_timesteps``), a float in [0, T]: the
  number diffusers' pipelines pass to the transformer (``scheduler.timesteps``). Grid levels are
  these τ (:mod:`diffgeo.sampling.flow`); σ = τ / T. Integers are accepted as the same number.
- ``native`` / :meth:`FlowBackbone.velocity` return the velocity v = ε − x0; ``eps`` returns
  ε̂ = x + (1 − σ)·v (``prediction_type`` is ``"flow"``).
- The state is the VAE posterior mean, shifted and scaled: (mean − ``shift_factor``) ·
  ``scaling_factor`` (SD3 and FLUX VAEs define both).
- ``h`` is the image-token output of one transformer block (``h_block``), shape (tokens, dim);
  :meth:`encode` returns it with the text stream after that block and the conditioning
  embedding, and ``decode`` runs the remaining blocks from them — the transformer analogue of the
  U-Net's skip reuse (the text stream is held as it was, as skips are).
- Token grid: one image token covers ``patch × vae_scale_factor`` pixels square (SD3: 2 × 8 =
  16; FLUX packs 2×2 latents per token: 16). :meth:`FlowBackbone.token_region` maps a pixel mask
  onto it by the area rule of ``diffgeo.io.regions`` (the fraction of each token's pixels inside
  the mask), flattened in the row-major token order both transformers use.

``alphas_cumprod`` (required by the base class) holds the VP equivalent of the flow at integer
model times, ᾱ(σ) = (1 − σ)² / ((1 − σ)² + σ²) for σ = k/T, k = 0..T−1; no flow step reads it
(flow grids refuse ``alpha_bar``), it only keeps the model's identity comparable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from diffgeo.backbones.autodiff import unet_derivative_mode
from diffgeo.backbones.base import Backbone, Conditioning, Encoded
from diffgeo.errors import InputError
from diffgeo.io.regions import area_resize, as_mask
from diffgeo.sampling.flow import FlowRule, eps_from_velocity


def check_h_block(value: Any, num_blocks: int) -> int:
    """``value`` as the index of the transformer block whose image tokens are h (0-based over
    all ``num_blocks`` blocks), or an :class:`InputError` saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_blocks:
        raise InputError(f"h_block must be an integer in 0..{num_blocks - 1} (the "
                         f"transformer block whose image tokens are h), got {value!r}")
    return value


def check_guidance(value: Any, guidance_embeds: bool, model: str) -> float | None:
    """FLUX's embedded guidance: ``value`` (None: FluxPipeline's default 3.5) for a
    guidance-distilled transformer (``guidance_embeds``), None for one without; a value given
    for a model that has no guidance embedding is refused (it would be silently ignored)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(value)):
        raise InputError(f"guidance must be a finite number, got {value!r}")
    if not guidance_embeds:
        if value is not None:
            raise InputError(f"guidance (--guidance) is FLUX's embedded guidance of "
                             f"guidance-distilled models, and {model} has none (its transformer "
                             "has no guidance_embeds): use classifier-free guidance instead")
        return None
    return DEFAULT_EMBEDDED_GUIDANCE if value is None else float(value)


#: FluxPipeline's default guidance_scale (the embedded guidance of FLUX.1-dev).
DEFAULT_EMBEDDED_GUIDANCE = 3.5


def vae_scale_factor(vae) -> int:
    """Image pixels per latent cell (side) of an AutoencoderKL, as the pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vp_equivalent_alphas(num_train_timesteps: int) -> torch.Tensor:
    s = torch.arange(num_train_timesteps, dtype=torch.float64) / num_train_timesteps
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


class FlowBackbone(Backbone):
    """The shared half of the flow adapters: time, velocity → ε, VAE states, token regions."""

    kind = "flow"
    prediction_type = "flow"
    conditional = True
    family = "flow"

    def __init__(self, transformer, vae, rule: FlowRule, *, h_block: int | None,
                 name: str, device: torch.device | str, dtype: torch.dtype):
        super().__init__(vp_equivalent_alphas(rule.num_train_timesteps), device, dtype)
        self.grid_rule = rule
        self.transformer, self.vae = transformer, vae
        self.name = name
        self.vae_scale_factor = vae_scale_factor(vae)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.h_block = self.default_h_block if h_block is None else h_block
        self._empty: Conditioning | None = None

    @property
    def default_h_block(self) -> int:
        """Block n/2 − 1 of n: the middle in depth (the family modules say why)."""
        return max(0, self.num_blocks // 2 - 1)

    @property
    def h_block(self) -> int:
        """The transformer block whose image tokens are h (0-based, over every block)."""
        return self._h_block

    @h_block.setter
    def h_block(self, value: int) -> None:
        self._h_block = check_h_block(value, self.num_blocks)

    # ------------------------------------------------------------------ to be provided
    @property
    def blocks(self) -> list:
        """The transformer blocks in the order h counts them."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image-token grid."""
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        # ``_latent``: the (h, w) latent grid, set by the family's constructor
        f = self.vae_scale_factor
        return (self._latent[0] * f, self._latent[1] * f)

    @property
    def token_pixels(self) -> int:
        """Side of the square of image pixels one token covers."""
        return self.image_size[0] // self.token_grid[0]

    # ------------------------------------------------------------------ time
    def timesteps(self, t: int | float | torch.Tensor, batch: int) -> torch.Tensor:
        """Validate a model time τ = σ·T and return it as a float64 tensor (batch,)."""
        if isinstance(t, bool):
            raise InputError(f"t must be a model time sigma*T, got {t!r}")
        if isinstance(t, torch.Tensor):
            if t.is_complex():
                raise InputError("t must be real")
            tt = t.detach().to(torch.float64).reshape(-1).cpu()
        elif isinstance(t, int | float) or hasattr(t, "__float__"):
            tt = torch.tensor([float(t)], dtype=torch.float64)
        else:
            raise InputError(f"t must be a model time sigma*T, got {type(t).__name__} {t!r}")
        if tt.numel() == 1:
            tt = tt.expand(batch)
        if tt.numel() != batch:
            raise InputError(f"t has {tt.numel()} entries for a batch of {batch}")
        T = self.num_train_timesteps
        if not bool(torch.isfinite(tt).all()) or float(tt.min()) < 0 or float(tt.max()) > T:
            raise InputError(f"t must lie in [0, {T}] (sigma*T), got {tt.tolist()}")
        return tt.to(self.device)

    def model_time(self, tt: torch.Tensor) -> torch.Tensor:
        """τ in the dtype the transformer's time embedding receives in the pipelines."""
        return tt.to(self.dtype)

    def sigmas(self, tt: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (tt / self.num_train_timesteps).to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps_from_velocity(x, out, self.sigmas(t, x))

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """The network's velocity v(x, τ) (what the flow step consumes)."""
        self.check_state(x)
        return self.native(x, self.timesteps(t, x.shape[0]), cond)

    # ------------------------------------------------------------------ images
    def to_state(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != self.image_size:
            raise InputError(f"image must have shape (B, 3, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(image.shape)}")
        mean = self.vae.encode(image.to(device=self.device, dtype=self.dtype)).latent_dist.mean
        return self.latents_to_state((mean - self.shift_factor) * self.scaling_factor)

    def to_image(self, state: torch.Tensor) -> torch.Tensor:
        self.check_state(state, "state")
        z = self.state_to_latents(state) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.dtype)).sample.clamp(-1, 1)

    def latents_to_state(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def state_to_latents(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def token_region(self, mask: Any, name: str = "region") -> torch.Tensor:
        """A pixel mask (H, W) on the token grid: (1, tokens, 1), each token the fraction of
        its ``token_pixels``² pixels inside the mask, row-major (h's token order)."""
        m = as_mask(mask, self.image_size, name)[None, None]
        r = area_resize(m, self.token_grid)
        return r.reshape(1, -1, 1).to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ conditioning
    def empty(self) -> Conditioning:
        if self._empty is None:
            self._empty = self._encode_prompt("")
        return self._empty

    def condition(self, prompt: str | None = None, **kwargs: Any) -> Conditioning | None:
        if kwargs:
            raise InputError(f"{self.family} conditioning takes a prompt only, got "
                             f"{sorted(kwargs)}")
        if not prompt:
            return self.empty()
        return self._encode_prompt(prompt)

    def _encode_prompt(self, prompt: str) -> Conditioning:
        raise NotImplementedError

    def conditioning(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                     prompt: str) -> Conditioning:
        """What a pipeline's ``encode_prompt`` returned, as the transformer's conditioning."""
        return Conditioning(encoder_hidden_states=prompt_embeds.to(self.dtype),
                            added={"pooled_projections": pooled.to(self.dtype)}, prompt=prompt)

    def _cond(self, cond: Conditioning | None, batch: int) -> Conditioning:
        return (cond if cond is not None else self.empty()).expand(batch)

    # ------------------------------------------------------------------ autodiff
    @contextlib.contextmanager
    def derivative_mode(self) -> Iterator[None]:
        with unet_derivative_mode(self.transformer):
            yield

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    def describe_h_block(self) -> str:
        return f"block {self.h_block}"

    @property
    def summary_kind(self) -> str:
        return (f"{self.family} (flow-matching transformer, {self.num_blocks} blocks, h = "
                f"{self.describe_h_block()}, token grid {self.token_grid[0]}x"
                f"{self.token_grid[1]} of {self.token_pixels}px)")

    def features(self, x, t, cond=None):
        self.check_state(x)
        enc = self.encode(x, t, cond)
        _, feats = self.decode(enc, enc.h, return_features=True)
        return feats

    def new_encoded(self, h, stream, temb, tt, x, cond, **extra) -> Encoded:
        return Encoded(h=h, skips=(stream,) if stream is not None else (), emb=temb,
                       timesteps=tt, x=x, cond=cond, extra=extra)


__all__ = ["DEFAULT_EMBEDDED_GUIDANCE", "FlowBackbone", "check_guidance", "check_h_block",
           "vae_scale_factor", "vp_equivalent_alphas"]
