"""Pixel-space DDPMs: diffusers ``UNet2DModel`` (google/ddpm-*, the embedded default model)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from diffgeo.backbones.autodiff import unet_derivative_mode
from diffgeo.backbones.base import Backbone, Conditioning, Encoded, prepare_module
from diffgeo.errors import InputError


class PixelBackbone(Backbone):
    """A ``UNet2DModel`` running directly on images in [-1, 1].

    A network with twice as many output channels as input channels predicts ε and a learned
    variance (improved DDPM, guided diffusion); only the first half, ε, is used: deterministic
    DDIM never needs the variance, and stochastic DDIM's σ comes from η, not from the model.
    """

    kind = "pixel"

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 name: str = "", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(alphas_cumprod, device, dtype)
        self.unet = prepare_module(unet, self.device, dtype)
        self.prediction_type = prediction_type
        self.name = name
        self.conditional = unet.class_embedding is not None
        c_in, c_out = unet.config.in_channels, unet.config.out_channels
        if c_out not in (c_in, 2 * c_in):
            raise InputError(f"the UNet2DModel has {c_out} output channels for {c_in} input "
                             "channels: ε needs as many (or twice as many, with a learned "
                             "variance)")
        self._eps_channels = c_in if c_out == 2 * c_in else None
        size = unet.config.sample_size
        self._size = (size, size) if isinstance(size, int) else tuple(size)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, *self._size)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._size  # type: ignore[return-value]

    def native(self, x, t, cond=None):
        tt = self.timesteps(t, x.shape[0])
        labels = None if cond is None else cond.expand(x.shape[0]).class_labels
        return self._eps_part(self.unet(x, tt, class_labels=labels).sample)

    def _eps_part(self, out: torch.Tensor) -> torch.Tensor:
        return out if self._eps_channels is None else out[:, :self._eps_channels]

    def encode(self, x, t, cond: Conditioning | None = None) -> Encoded:
        u = self.unet
        tt = self.timesteps(t, x.shape[0])
        # Mirrors UNet2DModel.forward up to the mid block (diffusers 0.3x-0.4x).
        t_emb = u.time_proj(tt).to(dtype=x.dtype)
        emb = u.time_embedding(t_emb)
        if u.class_embedding is not None:
            if cond is None or cond.class_labels is None:
                raise InputError("this model is class-conditional: pass cond with class_labels")
            labels = cond.expand(x.shape[0]).class_labels
            if u.config.class_embed_type == "timestep":
                labels = u.time_proj(labels)
            emb = emb + u.class_embedding(labels).to(dtype=x.dtype)
        if u.config.center_input_sample:
            x_in = 2 * x - 1.0
        else:
            x_in = x
        skip_sample = x_in
        sample = u.conv_in(x_in)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in u.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, res, skip_sample = block(hidden_states=sample, temb=emb,
                                                 skip_sample=skip_sample)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if u.mid_block is not None:
            sample = u.mid_block(sample, emb)
        return Encoded(h=sample, skips=skips, emb=emb, timesteps=tt, x=x, cond=cond)

    def decode(self, enc: Encoded, h: torch.Tensor, return_features: bool = False):
        u = self.unet
        sample, skips, emb = h, enc.skips, enc.emb
        skip_sample = None
        feats = []
        for block in u.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, res, emb, skip_sample)
            else:
                sample = block(sample, res, emb)
            feats.append(sample)
        sample = u.conv_out(u.conv_act(u.conv_norm_out(sample)))
        if skip_sample is not None:
            sample = sample + skip_sample
        if u.config.time_embedding_type == "fourier":
            sample = sample / enc.timesteps.reshape(-1, 1, 1, 1).to(sample.dtype)
        sample = self._eps_part(sample)
        return (sample, feats) if return_features else sample

    @contextlib.contextmanager
    def derivative_mode(self) -> Iterator[None]:
        with unet_derivative_mode(self.unet):
            yield

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())
