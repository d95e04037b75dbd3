"""Randomly initialised Stable-Diffusion-shaped backbones for benchmarks (compute does not depend
on weight values, so timings need no downloaded weights).

``small``: SD 1.5's block structure with narrow channels at a 32x32 latent (CPU-friendly);
``sd15``: the SD 1.5 U-Net configuration at a 64x64 latent (512 px); ``sd21``: the SD 2.1-base
U-Net configuration (1024-wide cross-attention, linear projections, head dims 5/10/20/20) at a
64x64 latent (512 px). The VAE is a narrow 8x-downsampling one: it runs once per edit.
"""

from __future__ import annotations

import torch

from diffgeo.backbones import Conditioning, LatentBackbone

KINDS = ("small", "sd15", "sd21")


def sd_backbone(kind: str, device: str) -> LatentBackbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffgeo.train import ddpm_scheduler

    torch.manual_seed(0)
    if kind == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        ctx_dim, res = 768, 512
    elif kind == "sd21":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=1024,
                                    attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True)
        ctx_dim, res = 1024, 512
    elif kind == "small":
        unet = UNet2DConditionModel(
            sample_size=32, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64,
            attention_head_dim=8, norm_num_groups=16, layers_per_block=2)
        ctx_dim, res = 64, 256
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
    bb = LatentBackbone(unet, vae, ddpm_scheduler().alphas_cumprod, device=device,
                        name=f"random SD-shaped U-Net ({kind})", resolution=res)
    # No text encoder: the empty-prompt conditioning is a fixed random context of CLIP's shape.
    bb._empty = Conditioning(encoder_hidden_states=torch.randn(1, 77, ctx_dim, device=device))
    return bb
