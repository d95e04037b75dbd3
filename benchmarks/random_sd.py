"""Randomly initialised Stable-Diffusion-shaped backbones for benchmarks (compute does not depend
on weight values, so timings need no downloaded weights).

``tiny``: two blocks (one with cross-attention) at an 8x8 latent, for smoke runs;
``small``: SD 1.5's block structure with narrow channels at a 32x32 latent (CPU-friendly);
``sd15``: the SD 1.5 U-Net configuration at a 64x64 latent (512 px); ``sd21``: the SD 2.1-base
U-Net configuration (1024-wide cross-attention, linear projections, head dims 5/10/20/20) at a
64x64 latent (512 px). The VAE is a narrow 8x-downsampling one: it runs once per edit.

``sdxl_img2img_pipeline``: diffusers' SDXL img2img pipeline over random modules of SDXL's shape
(``sdxl``: the SDXL-base U-Net configuration at a 128x128 latent, 1024 px; ``sdxl-tiny``: the same
conditioning — two text encoders, pooled text and size embeddings — with a two-block U-Net at an
8x8 latent, for CPU smoke runs), with one-layer text encoders of the real widths.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from diffgeo.backbones import Conditioning, LatentBackbone

KINDS = ("tiny", "small", "sd15", "sd21")
SDXL_KINDS = ("sdxl-tiny", "sdxl")
#: The Stable Diffusion noise schedule for deterministic DDIM (the benchmarks' shared scheduler).
DDIM_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                   timestep_spacing="leading")


def narrow_vae(sample_size: int | None = None):
    """A narrow 8x-downsampling VAE (4 latent channels): a cheap stand-in for SD's."""
    from diffusers import AutoencoderKL

    kw = {} if sample_size is None else {"sample_size": sample_size}
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, **kw)


def write_clip_tokenizer(folder: Path, max_length: int = 16):
    """A 54-token CLIP tokenizer (letters) saved to ``folder``: the text side of a random model."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def sd_backbone(kind: str, device: str, dtype: torch.dtype = torch.float32) -> LatentBackbone:
    from diffusers import UNet2DConditionModel

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
    elif kind == "tiny":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            attention_head_dim=8, norm_num_groups=8)
        ctx_dim, res = 16, 64
    elif kind == "small":
        unet = UNet2DConditionModel(
            sample_size=32, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64,
            attention_head_dim=8, norm_num_groups=16, layers_per_block=2)
        ctx_dim, res = 64, 256
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    bb = LatentBackbone(unet, narrow_vae(), ddpm_scheduler().alphas_cumprod, device=device,
                        dtype=dtype, name=f"random SD-shaped U-Net ({kind})", resolution=res)
    # No text encoder: the empty-prompt conditioning is a fixed random context of CLIP's shape.
    context = torch.randn(1, 77, ctx_dim, generator=torch.Generator().manual_seed(0))
    bb._empty = Conditioning(encoder_hidden_states=context.to(device, dtype))
    return bb


def sdxl_img2img_pipeline(kind: str, device: str):
    """``StableDiffusionXLImg2ImgPipeline`` over random SDXL-shaped modules, on ``device``
    (float32; built there, so the 2.6B-parameter U-Net is initialised by the device), with
    :data:`DDIM_CONFIG`'s scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind == "sdxl":
        widths, proj, time_dim = (768, 1280), 1280, 256
        unet_kw = dict(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            use_linear_projection=True)
    elif kind == "sdxl-tiny":
        widths, proj, time_dim = (16, 24), 12, 4
        unet_kw = dict(
            sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
            norm_num_groups=8)
    else:
        raise ValueError(f"kind must be one of {SDXL_KINDS}, got {kind!r}")
    text_kw = dict(vocab_size=100, num_hidden_layers=1, num_attention_heads=2,
                   max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4, cross_attention_dim=sum(widths),
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=proj + 6 * time_dim, **unet_kw)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], intermediate_size=widths[0],
                                           **text_kw))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=widths[1], intermediate_size=widths[1], projection_dim=proj, **text_kw))
        vae = narrow_vae(sample_size=unet.config.sample_size * 8)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp) / "tokenizer")
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=DDIMScheduler(**DDIM_CONFIG), requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
