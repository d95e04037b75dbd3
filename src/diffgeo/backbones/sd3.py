"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (MMDiT) + AutoencoderKL + CLIP-L/G (+ T5).

Prompts are encoded by diffusers' own ``StableDiffusion3Pipeline.encode_prompt`` on the
adapter's modules (CLIP-L and CLIP-G penultimate states, zero-padded to the joint dimension and
followed by T5's states — zeros when the pipeline has no T5 — plus the two pooled CLIP vectors),
so the conditioning equals the pipeline's.

h = the image tokens after block ``h_block`` (default: block n/2 − 1, the middle). Why the
middle: an MMDiT has no spatial bottleneck, only depth; at the middle as many blocks have formed
h as remain to turn an edit of h into a velocity, which is the role the U-Net's mid block plays
(RBE, Asyrp). ``benchmarks/flow_blocks.py`` measures the spectrum of Dh per block for choosing
another one.
"""

from __future__ import annotations

import torch

from diffgeo.backbones.base import Conditioning, Encoded, prepare_module
from diffgeo.backbones.flow import FlowBackbone, vae_scale_factor
from diffgeo.errors import InputError
from diffgeo.sampling.flow import FlowRule


class SD3Backbone(FlowBackbone):
    family = "sd3"

    def __init__(self, pipe, *, h_block: int | None = None, name: str = "",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 resolution: int | None = None, max_sequence_length: int = 256):
        tr = prepare_module(pipe.transformer, torch.device(device), dtype)
        vae = prepare_module(pipe.vae, torch.device(device), dtype)
        for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            m = getattr(pipe, key, None)
            if m is not None:
                setattr(pipe, key, prepare_module(m, torch.device(device), dtype))
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            raise InputError("an SD3 pipeline needs both CLIP text encoders (text_encoder, "
                             "text_encoder_2); T5 (text_encoder_3) may be left out")
        pipe.transformer, pipe.vae = tr, vae
        self.pipe = pipe
        self.patch = int(tr.config.patch_size)
        vae_factor = vae_scale_factor(vae)
        latent = int(tr.config.sample_size)
        if resolution is not None:
            if resolution % (vae_factor * self.patch):
                raise InputError(f"resolution must be a multiple of {vae_factor * self.patch}, "
                                 f"got {resolution}")
            latent = resolution // vae_factor
        self._latent = (latent, latent)
        self.max_sequence_length = int(max_sequence_length)
        tokens = (latent // self.patch) ** 2
        rule = FlowRule.from_config(dict(pipe.scheduler.config), tokens, "scheduler")
        super().__init__(tr, vae, rule, h_block=h_block, name=name, device=device, dtype=dtype)

    @staticmethod
    def num_blocks_of(config) -> int:
        """Blocks of the SD3Transformer2DModel a config describes."""
        return int(config.num_layers)

    @property
    def blocks(self) -> list:
        return list(self.transformer.transformer_blocks)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (int(self.transformer.config.in_channels), *self._latent)

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self._latent[0] // self.patch, self._latent[1] // self.patch)

    # ------------------------------------------------------------------ text
    def _encode_prompt(self, prompt: str) -> Conditioning:
        with torch.no_grad():
            pe, _, pooled, _ = self.pipe.encode_prompt(
                prompt, None, None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
        return self.conditioning(pe, pooled, prompt)

    # ------------------------------------------------------------------ the model
    def native(self, x, t, cond=None):
        tt = self.timesteps(t, x.shape[0])
        c = self._cond(cond, x.shape[0])
        return self.transformer(hidden_states=x, timestep=self.model_time(tt),
                                encoder_hidden_states=c.encoder_hidden_states,
                                pooled_projections=c.added["pooled_projections"],
                                return_dict=False)[0]

    def encode(self, x, t, cond: Conditioning | None = None) -> Encoded:
        self.check_state(x)
        tt = self.timesteps(t, x.shape[0])
        c = self._cond(cond, x.shape[0])
        tr = self.transformer
        hs = tr.pos_embed(x).contiguous()
        temb = tr.time_text_embed(self.model_time(tt), c.added["pooled_projections"])
        stream = tr.context_embedder(c.encoder_hidden_states)
        for block in self.blocks[: self.h_block + 1]:
            stream, hs = block(hidden_states=hs, encoder_hidden_states=stream, temb=temb)
        return self.new_encoded(hs, stream, temb, tt, x, c)

    def decode(self, enc: Encoded, h: torch.Tensor, return_features: bool = False):
        tr = self.transformer
        hs, stream = h, (enc.skips[0] if enc.skips else None)
        feats = []
        for block in self.blocks[self.h_block + 1:]:
            stream, hs = block(hidden_states=hs, encoder_hidden_states=stream, temb=enc.emb)
            feats.append(hs)
        out = tr.proj_out(tr.norm_out(hs, enc.emb))
        p, (gh, gw), c = self.patch, self.token_grid, tr.out_channels
        out = out.reshape(out.shape[0], gh, gw, p, p, c)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], c, gh * p, gw * p)
        return (out, feats) if return_features else out


__all__ = ["SD3Backbone"]
