"""Latent diffusion: Stable Diffusion 1.x / 2.x and SDXL (``UNet2DConditionModel`` + VAE + CLIP).

The state is the VAE posterior *mean* times ``vae.config.scaling_factor`` (after subtracting
``shift_factor`` where the VAE defines one): deterministic, so inversion starts from the same point
every time. Text conditioning defaults to the empty prompt, computed once and cached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from diffgeo.backbones.autodiff import unet_derivative_mode
from diffgeo.backbones.base import Backbone, Conditioning, Encoded, prepare_module
from diffgeo.errors import InputError


class LatentBackbone(Backbone):
    kind = "latent"
    conditional = True

    def __init__(self, unet, vae, alphas_cumprod: torch.Tensor, text_encoder=None,
                 tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                 prediction_type: str = "epsilon", name: str = "",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 resolution: int | None = None):
        super().__init__(alphas_cumprod, device, dtype)
        mods = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
        for key, m in mods.items():
            if m is not None:
                setattr(self, key, prepare_module(m, self.device, dtype))
            else:
                setattr(self, key, None)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.prediction_type = prediction_type
        self.name = name
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        latent = unet.config.sample_size
        if resolution is not None:
            if resolution % (self.vae_scale_factor * 8):
                raise InputError(f"resolution must be a multiple of {self.vae_scale_factor * 8}, "
                                 f"got {resolution}")
            latent = resolution // self.vae_scale_factor
        self._latent = (latent, latent) if isinstance(latent, int) else tuple(latent)
        self.is_sdxl = text_encoder_2 is not None or (
            unet.config.addition_embed_type == "text_time")
        self._empty: Conditioning | None = None

    # ------------------------------------------------------------------ shapes
    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, *self._latent)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self._latent[0] * self.vae_scale_factor, self._latent[1] * self.vae_scale_factor)

    # ------------------------------------------------------------------ images
    def to_state(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != self.image_size:
            raise InputError(f"image must have shape (B, 3, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(image.shape)}")
        image = image.to(device=self.device, dtype=self.dtype)
        mean = self.vae.encode(image).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def to_image(self, state: torch.Tensor) -> torch.Tensor:
        self.check_state(state, "state")
        z = state / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.dtype)).sample.clamp(-1, 1)

    # ------------------------------------------------------------------ text
    def _encode_text(self, prompt: str, tokenizer, encoder, penultimate: bool):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(self.device)
        out = encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-2] if penultimate else out[0]
        return hidden, out

    @torch.no_grad()
    def condition(self, prompt: str | None = None, *, original_size: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0), **kwargs: Any) -> Conditioning:
        """Text conditioning (and SDXL's size/crop conditioning) for ``prompt`` ('' by default)."""
        if kwargs:
            raise InputError(f"unknown conditioning options: {sorted(kwargs)}")
        prompt = prompt or ""
        if prompt == "" and self._empty is not None and original_size is None:
            return self._empty
        if self.text_encoder is None or self.tokenizer is None:
            raise InputError("this model has no text encoder: pass a Conditioning with "
                             "encoder_hidden_states yourself")
        if not self.is_sdxl:
            hidden, _ = self._encode_text(prompt, self.tokenizer, self.text_encoder, False)
            cond = Conditioning(encoder_hidden_states=hidden.to(self.dtype), prompt=prompt)
        else:
            if self.text_encoder_2 is None or self.tokenizer_2 is None:
                raise InputError("SDXL conditioning needs text_encoder_2 and tokenizer_2")
            h1, _ = self._encode_text(prompt, self.tokenizer, self.text_encoder, True)
            h2, out2 = self._encode_text(prompt, self.tokenizer_2, self.text_encoder_2, True)
            pooled = out2[0]  # CLIPTextModelWithProjection: text_embeds first
            size = original_size or self.image_size
            time_ids = torch.tensor([[*size, *crop_top_left, *self.image_size]],
                                    dtype=self.dtype, device=self.device)
            cond = Conditioning(
                encoder_hidden_states=torch.cat([h1, h2], dim=-1).to(self.dtype),
                added={"text_embeds": pooled.to(self.dtype), "time_ids": time_ids},
                prompt=prompt,
            )
        if prompt == "" and original_size is None:
            self._empty = cond
        return cond

    def _cond(self, cond: Conditioning | None, batch: int) -> Conditioning:
        if cond is None:
            cond = self.condition("")
        if cond.encoder_hidden_states is None:
            raise InputError("cond.encoder_hidden_states is required by this model")
        return cond.expand(batch)

    # ------------------------------------------------------------------ U-Net halves
    def native(self, x, t, cond=None):
        tt = self.timesteps(t, x.shape[0])
        c = self._cond(cond, x.shape[0])
        return self.unet(x, tt, encoder_hidden_states=c.encoder_hidden_states,
                         added_cond_kwargs=c.added or None, class_labels=c.class_labels).sample

    def encode(self, x, t, cond: Conditioning | None = None) -> Encoded:
        u = self.unet
        tt = self.timesteps(t, x.shape[0])
        c = self._cond(cond, x.shape[0])
        ehs = c.encoder_hidden_states
        if u.config.addition_embed_type == "image_hint":
            raise InputError("image_hint U-Nets (ControlNet-XS style) are not supported")
        # Mirrors UNet2DConditionModel.forward up to the mid block (diffusers 0.3x-0.4x).
        sample = 2 * x - 1.0 if u.config.center_input_sample else x
        t_emb = u.get_time_embed(sample=sample, timestep=tt)
        emb = u.time_embedding(t_emb, None)
        class_emb = u.get_class_embed(sample=sample, class_labels=c.class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], -1) if u.config.class_embeddings_concat else (
                emb + class_emb)
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=c.added)
        if aug is not None:
            emb = emb + aug
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        ehs = u.process_encoder_hidden_states(encoder_hidden_states=ehs,
                                              added_cond_kwargs=c.added)
        sample = u.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                sample = u.mid_block(sample, emb, encoder_hidden_states=ehs)
            else:
                sample = u.mid_block(sample, emb)
        return Encoded(h=sample, skips=skips, emb=emb, timesteps=tt, x=x, cond=c,
                       extra={"encoder_hidden_states": ehs})

    def decode(self, enc: Encoded, h: torch.Tensor, return_features: bool = False):
        u = self.unet
        ehs = enc.extra["encoder_hidden_states"]
        factor = 2**u.num_upsamplers
        forward_upsample_size = any(d % factor != 0 for d in enc.x.shape[-2:])
        sample, skips, emb = h, enc.skips, enc.emb
        feats = []
        for i, block in enumerate(u.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if (i < len(u.up_blocks) - 1 and
                                           forward_upsample_size) else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=ehs, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               upsample_size=size)
            feats.append(sample)
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        sample = u.conv_out(sample)
        return (sample, feats) if return_features else sample

    @contextlib.contextmanager
    def derivative_mode(self) -> Iterator[None]:
        with unet_derivative_mode(self.unet, self.vae):
            yield

    @property
    def summary_kind(self) -> str:
        return "sdxl" if self.is_sdxl else self.kind

    def parameters_count(self) -> int:
        return sum(p.numel() for m in (self.unet, self.vae, self.text_encoder,
                                       self.text_encoder_2) if m is not None
                   for p in m.parameters())
