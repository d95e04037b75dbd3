"""FLUX.1: ``FluxTransformer2DModel`` (double- then single-stream blocks) + AutoencoderKL +
CLIP-L + T5.

The state is the *unpacked* latent (C, H, W), so masks and the Euler step act on the latent grid
as for every other latent model; ``native`` packs it into FluxPipeline's 2×2 tokens
(``FluxPipeline._pack_latents``) with the pipeline's ``img_ids`` / ``txt_ids`` and unpacks the
velocity (``_unpack_latents``). Packing is a permutation, so a step on the unpacked state equals
the pipeline's step on the packed one element for element. Prompts go through
``FluxPipeline.encode_prompt``; the guidance-distilled models (``guidance_embeds``) take the
embedded guidance ``guidance`` (FluxPipeline's ``guidance_scale``, default 3.5); classifier-free
guidance with an empty prompt (FluxPipeline's ``true_cfg_scale``) is the usual ``Guidance``.

h = the image tokens after block ``h_block`` counted over the double-stream blocks then the
single-stream ones (default n/2 − 1 of all n blocks, the middle in depth, as for SD3: the
single-stream blocks are still split into text and image tokens by diffusers, so h is always
the image part). ``decode`` runs the remaining blocks with the text stream and the rotary
embedding ``encode`` computed.

Rotary precision: diffusers computes the rotary cos/sin and applies them in float32 even for
float64 inputs, which caps float64 oracles (finite differences, exact inversion) at float32
round-off. A float64 backbone (and ``derivative_mode``) therefore runs both in the input dtype
(:func:`rope_in_input_dtype`, patched at this adapter's level and restored on exit); float32 and
half-precision runs keep diffusers' code, so they equal the pipeline bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from diffgeo.backbones.base import Conditioning, Encoded, prepare_module
from diffgeo.backbones.flow import FlowBackbone, check_guidance, vae_scale_factor
from diffgeo.errors import InputError
from diffgeo.sampling.flow import FlowRule


def _rotary_in_dtype(x: torch.Tensor, freqs_cis, use_real: bool = True,
                     use_real_unbind_dim: int = -1, sequence_dim: int = 2) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` for FLUX (real pairs, unbind -1) without its float32
    cast: the rotation in x's own dtype."""
    if not use_real or use_real_unbind_dim != -1:
        raise InputError("rope_in_input_dtype covers FLUX's rotary form only")
    cos, sin = freqs_cis
    idx = (None, None, slice(None), slice(None)) if sequence_dim == 2 else (
        None, slice(None), None, slice(None))
    cos, sin = cos[idx].to(x), sin[idx].to(x)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return x * cos + rotated * sin


def _pos_embed_float64(module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxPosEmbed.forward`` keeping its float64 cos/sin (diffusers ends with .float())."""
    cos_out, sin_out = [], []
    pos = ids.to(torch.float64)
    for i, dim in enumerate(module.axes_dim):
        freqs = 1.0 / (module.theta ** (torch.arange(0, dim, 2, dtype=torch.float64,
                                                     device=ids.device) / dim))
        angles = torch.outer(pos[:, i], freqs)
        cos_out.append(angles.cos().repeat_interleave(2, dim=1))
        sin_out.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


@contextlib.contextmanager
def rope_in_input_dtype(transformer) -> Iterator[None]:
    """Run FLUX's rotary embedding in the input dtype inside the block (see the module doc)."""
    import functools

    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb
    pe = transformer.pos_embed
    if original is _rotary_in_dtype:  # nested (derivative mode around a float64 pass)
        yield
        return
    try:
        transformer_flux.apply_rotary_emb = _rotary_in_dtype
        pe.forward = functools.partial(_pos_embed_float64, pe)
        yield
    finally:
        transformer_flux.apply_rotary_emb = original
        del pe.forward


class FluxBackbone(FlowBackbone):
    family = "flux"

    def __init__(self, pipe, *, h_block: int | None = None, name: str = "",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 resolution: int | None = None, guidance: float | None = None,
                 max_sequence_length: int = 512):
        dev = torch.device(device)
        pipe.transformer = prepare_module(pipe.transformer, dev, dtype)
        pipe.vae = prepare_module(pipe.vae, dev, dtype)
        for key in ("text_encoder", "text_encoder_2"):
            m = getattr(pipe, key, None)
            if m is None:
                raise InputError(f"a FLUX pipeline needs its {key} (CLIP and T5)")
            setattr(pipe, key, prepare_module(m, dev, dtype))
        self.pipe = pipe
        tr = pipe.transformer
        vae_factor = vae_scale_factor(pipe.vae)
        # the VAE's configured image size (1024 on FLUX.1, as FluxPipeline's default)
        size = resolution if resolution is not None else pipe.vae.config.sample_size
        if isinstance(size, list | tuple):
            size = int(size[0])
        if isinstance(size, bool) or not isinstance(size, int) or size % (vae_factor * 2) \
                or size < vae_factor * 2:
            raise InputError(f"resolution must be a positive multiple of {vae_factor * 2} "
                             f"(the vae factor times FLUX's 2x2 packing), got {size!r}")
        side = 2 * (size // (vae_factor * 2))
        self._latent = (side, side)
        self.embedded_guidance = check_guidance(guidance, bool(tr.config.guidance_embeds),
                                                name or "this FLUX model")
        self.max_sequence_length = int(max_sequence_length)
        rule = FlowRule.from_config(dict(pipe.scheduler.config), (side // 2) ** 2, "flux")
        super().__init__(tr, pipe.vae, rule, h_block=h_block, name=name, device=device,
                         dtype=dtype)

    # ------------------------------------------------------------------ shapes
    @property
    def blocks(self) -> list:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    @staticmethod
    def num_blocks_of(config) -> int:
        """Blocks (double- then single-stream) of the FluxTransformer2DModel a config
        describes."""
        return int(config.num_layers) + int(config.num_single_layers)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (int(self.transformer.config.in_channels) // 4, *self._latent)

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self._latent[0] // 2, self._latent[1] // 2)

    def describe_h_block(self) -> str:
        n2 = len(self.transformer.transformer_blocks)
        return (f"double-stream block {self.h_block}" if self.h_block < n2
                else f"single-stream block {self.h_block - n2}")

    @property
    def summary_kind(self) -> str:
        return super().summary_kind + (f", embedded guidance {self.embedded_guidance}"
                                       if self.embedded_guidance is not None else "")

    # ------------------------------------------------------------------ text
    def _encode_prompt(self, prompt: str) -> Conditioning:
        with torch.no_grad():
            pe, pooled, _ = self.pipe.encode_prompt(
                prompt, None, device=self.device, max_sequence_length=self.max_sequence_length)
        return self.conditioning(pe, pooled, prompt)

    # ------------------------------------------------------------------ the model
    def model_time(self, tt: torch.Tensor) -> torch.Tensor:
        # FluxPipeline passes t / 1000 and the transformer multiplies by 1000 again
        return tt.to(self.dtype) / 1000

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self.dtype == torch.float64:
            with rope_in_input_dtype(self.transformer):
                yield
        else:
            yield

    @contextlib.contextmanager
    def derivative_mode(self) -> Iterator[None]:
        with super().derivative_mode(), rope_in_input_dtype(self.transformer):
            yield

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        return self.pipe._pack_latents(x, B, C, H, W)

    def _unpack(self, out: torch.Tensor) -> torch.Tensor:
        h, w = self.image_size
        return self.pipe._unpack_latents(out, h, w, self.vae_scale_factor)

    def _inputs(self, x: torch.Tensor, tt: torch.Tensor, c: Conditioning) -> dict:
        B = x.shape[0]
        gh, gw = self.token_grid
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full((B,), self.embedded_guidance, device=self.device,
                                  dtype=torch.float32)
        # FluxPipeline.encode_prompt's text ids are zeros of the prompt's length
        txt_ids = torch.zeros(c.encoder_hidden_states.shape[1], 3, device=self.device,
                              dtype=self.dtype)
        img_ids = self.pipe._prepare_latent_image_ids(B, gh, gw, self.device, self.dtype)
        return dict(timestep=self.model_time(tt), guidance=guidance,
                    pooled_projections=c.added["pooled_projections"],
                    encoder_hidden_states=c.encoder_hidden_states, txt_ids=txt_ids,
                    img_ids=img_ids)

    def native(self, x, t, cond=None):
        tt = self.timesteps(t, x.shape[0])
        c = self._cond(cond, x.shape[0])
        with self._precision():
            out = self.transformer(hidden_states=self._pack(x), return_dict=False,
                                   **self._inputs(x, tt, c))[0]
        return self._unpack(out)

    def encode(self, x, t, cond: Conditioning | None = None) -> Encoded:
        self.check_state(x)
        tt = self.timesteps(t, x.shape[0])
        c = self._cond(cond, x.shape[0])
        tr, kw = self.transformer, self._inputs(x, tt, c)
        with self._precision():
            hs = tr.x_embedder(self._pack(x))
            timestep = kw["timestep"].to(hs.dtype) * 1000
            if kw["guidance"] is None:
                temb = tr.time_text_embed(timestep, kw["pooled_projections"])
            else:
                temb = tr.time_text_embed(timestep, kw["guidance"].to(hs.dtype) * 1000,
                                          kw["pooled_projections"])
            stream = tr.context_embedder(kw["encoder_hidden_states"])
            rope = tr.pos_embed(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=0))
            for block in self.blocks[: self.h_block + 1]:
                stream, hs = block(hidden_states=hs, encoder_hidden_states=stream, temb=temb,
                                   image_rotary_emb=rope)
        return self.new_encoded(hs, stream, temb, tt, x, c, rope=rope)

    def decode(self, enc: Encoded, h: torch.Tensor, return_features: bool = False):
        tr = self.transformer
        hs, stream, rope = h, enc.skips[0], enc.extra["rope"]
        feats = []
        with self._precision():
            for block in self.blocks[self.h_block + 1:]:
                stream, hs = block(hidden_states=hs, encoder_hidden_states=stream, temb=enc.emb,
                                   image_rotary_emb=rope)
                feats.append(hs)
            out = self._unpack(tr.proj_out(tr.norm_out(hs, enc.emb)))
        return (out, feats) if return_features else out


__all__ = ["FluxBackbone", "rope_in_input_dtype"]
