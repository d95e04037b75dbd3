"""Tiny randomly initialised flow-matching pipelines (SD3, FLUX) written as diffusers folders,
and the numerical helpers the flow tests share.

Plain functions (no fixtures): test modules wrap them in their own session/module fixtures.
Every model is built from a config under a fixed seed and saved with ``save_pretrained``, so
loading goes through the same code path as a downloaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import _write_tokenizer

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                      base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
                      max_image_seq_len=64)
T_EVAL = 612.5  # a model time between the levels of the test grids


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def richardson(f, x: torch.Tensor, v: torch.Tensor, step: float = 1e-3) -> torch.Tensor:
    """Df(x)[v] by Richardson-extrapolated central differences (error ~1e-11 in float64)."""
    from diffgeo.jacobian import finite_difference

    return (4 * finite_difference(f, x, v, step / 2) - finite_difference(f, x, v, step)) / 3


def check_state_derivatives(bb64, output: str, seeds: tuple[int, int, int]) -> None:
    """float64 JVP of ``output`` ("eps" / "h") w.r.t. the state against :func:`richardson`,
    and the VJP against it by the adjoint identity ⟨Jᵀu, v⟩ = ⟨u, Jv⟩."""
    from diffgeo import jacobian as J

    x = torch.randn(2, *bb64.state_shape, generator=gen(seeds[0]), dtype=torch.float64)
    v = torch.randn(x.shape, generator=gen(seeds[1]), dtype=torch.float64)
    c = bb64.condition("a cat")
    rich = richardson(J.output_fn(bb64, T_EVAL, c, output), x, v)
    y, jv = J.jvp(bb64, x, v, T_EVAL, c, output=output)
    assert rel(jv, rich) <= 1e-9, rel(jv, rich)
    u = torch.randn(y.shape, generator=gen(seeds[2]), dtype=torch.float64)
    _, g = J.vjp(bb64, x, u, T_EVAL, c, output=output)
    lhs, rhs = float((g * v).sum()), float((u * jv).sum())
    assert abs(lhs - rhs) <= 1e-10 * abs(rhs)


def check_h_split(b, block: int, seed: int):
    """With h at ``block``: ε from the unmodified h is ε bit for bit, and h is the image-token
    output of the transformer's own block (a forward hook as the oracle). Returns (x, c, enc)."""
    b.h_block = block
    x = torch.randn(2, *b.state_shape, generator=gen(seed))
    c = b.condition("a dog")
    enc = b.encode(x, T_EVAL, c)
    assert torch.equal(b.eps_from_h(x, T_EVAL, enc.h, c, encoded=enc), b.eps(x, T_EVAL, c))
    seen = {}
    hook = b.blocks[block].register_forward_hook(
        lambda m, a, out: seen.update(h=out[1]))  # returns None: the output is kept
    b.velocity(x, T_EVAL, c)
    hook.remove()
    assert torch.equal(enc.h, seen["h"])
    return x, c, enc


TEXT_KW = dict(vocab_size=100, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def write_t5_tokenizer(folder: Path):
    """A character-level T5 tokenizer (Unigram vocabulary), loadable as T5TokenizerFast."""
    from tokenizers import Tokenizer, models
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz "]
    tok = T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram(vocab, unk_id=2)),
                          pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    tok.save_pretrained(folder)
    return tok


def tiny_t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=40, d_model=d_model, d_kv=8, d_ff=32,
                                   num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def tiny_vae(shift_factor: float, scaling_factor: float, latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(8, 16), latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=16, shift_factor=shift_factor,
                         scaling_factor=scaling_factor)


def _index(folder: Path, index: dict) -> Path:
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_sd3(folder: Path, *, t5: bool = True, num_layers: int = 2,
              scheduler: dict | None = None) -> Path:
    """Tiny SD3: 8×8×4 latents (16×16 pixels), patch 2 (a 4×4 token grid), CLIP-L/G, T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                   num_layers=num_layers, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=32,
                                   caption_projection_dim=16, pooled_projection_dim=16,
                                   pos_embed_max_size=8)
        te1 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=8,
                                                         **TEXT_KW))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=8,
                                                         **TEXT_KW))
        vae = tiny_vae(0.1, 1.5, 4)
        te3 = tiny_t5(32) if t5 else None
    tok = _write_tokenizer(folder / "tokenizer")
    _write_tokenizer(folder / "tokenizer_2")
    tr.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    FlowMatchEulerDiscreteScheduler(**(scheduler or SD3_SCHEDULER)).save_pretrained(
        folder / "scheduler")
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": [None, None],
        "tokenizer": ["transformers", type(tok).__name__],
        "tokenizer_2": ["transformers", type(tok).__name__],
        "tokenizer_3": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    if te3 is not None:
        te3.save_pretrained(folder / "text_encoder_3")
        t3 = write_t5_tokenizer(folder / "tokenizer_3")
        index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
        index["tokenizer_3"] = ["transformers", type(t3).__name__]
    return _index(folder, index)


def write_flux(folder: Path, *, guidance_embeds: bool = True, num_layers: int = 1,
               num_single_layers: int = 2, scheduler: dict | None = None) -> Path:
    """Tiny FLUX: 8×8×4 latents (16×16 pixels) packed 2×2 into a 4×4 token grid, CLIP + T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=num_layers,
                                    num_single_layers=num_single_layers, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                    axes_dims_rope=(4, 2, 2))
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=16, **TEXT_KW))
        te2 = tiny_t5(32)
        vae = tiny_vae(0.2, 1.3, 4)
    tok = _write_tokenizer(folder / "tokenizer")
    t5tok = write_t5_tokenizer(folder / "tokenizer_2")
    tr.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    FlowMatchEulerDiscreteScheduler(**(scheduler or FLUX_SCHEDULER)).save_pretrained(
        folder / "scheduler")
    return _index(folder, {
        "_class_name": "FluxPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", type(tok).__name__],
        "tokenizer_2": ["transformers", type(t5tok).__name__],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    })
