"""SDXL-shaped models: text + pooled + size conditioning, checked against diffusers' own
StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids on the same tiny components."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import SD_SCHEDULER, _write_tokenizer  # tests/ is on sys.path (rootdir conftest)

from diffgeo.backbones import load_backbone

os.environ["HF_HUB_OFFLINE"] = "1"


def _write_sdxl(folder: Path) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    folder.mkdir(parents=True, exist_ok=True)
    text_kw = dict(vocab_size=100, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                   eos_token_id=1, pad_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=16, **text_kw))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=12,
                                                         **text_kw))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16 + 24,
            attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 6 * 4,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
            latent_channels=4, norm_num_groups=4, sample_size=16,
        )
    tok = _write_tokenizer(folder / "tokenizer")
    _write_tokenizer(folder / "tokenizer_2")
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    EulerDiscreteScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", type(tok).__name__],
        "tokenizer_2": ["transformers", type(tok).__name__],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return load_backbone(_write_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"))


def test_sdxl_summary_and_conditioning_equal_the_diffusers_pipeline(sdxl):
    from diffusers import StableDiffusionXLPipeline

    s = sdxl.summary()
    assert s.kind == "sdxl" and s.image_size == (16, 16) and s.state_shape == (4, 8, 8)
    pipe = StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet,
        scheduler=__import__("diffusers").EulerDiscreteScheduler(**SD_SCHEDULER))
    for prompt in ("a red cube", ""):
        cond = sdxl.condition(prompt)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu",
                                                  num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        assert torch.allclose(cond.encoder_hidden_states, embeds, atol=1e-6)
        assert torch.allclose(cond.added["text_embeds"], pooled, atol=1e-6)
        time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                          text_encoder_projection_dim=12)
        assert torch.equal(cond.added["time_ids"], time_ids)


def test_sdxl_eps_h_and_eps_from_h_agree_with_the_unet(sdxl):
    cond = sdxl.condition("a cube")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = sdxl.eps(x, 500, cond)
        c = cond.expand(2)
        raw = sdxl.unet(x, torch.tensor([500, 500]), encoder_hidden_states=c.encoder_hidden_states,
                        added_cond_kwargs=c.added).sample
        enc = sdxl.encode(x, 500, cond)
        again = sdxl.eps_from_h(x, 500, enc.h, cond, encoded=enc)
    assert torch.allclose(eps, raw, atol=1e-5)
    assert torch.equal(again, sdxl.to_eps(sdxl.decode(enc, enc.h), x, enc.timesteps))
    assert torch.allclose(again, eps, atol=1e-5)
    # size conditioning reaches the model
    other = sdxl.condition("a cube", original_size=(32, 32))
    with torch.no_grad():
        assert not torch.allclose(sdxl.eps(x, 500, other), eps)


def test_pixels_edit_runs_on_sdxl_with_a_prompt_and_guidance(sdxl):
    from diffgeo.editing import PixelsConfig, pixels_edit

    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 4, 8, 8, generator=g)
    ex = torch.randn(1, 4, 8, 8, generator=g)
    m = torch.ones(1, 1, 16, 16)
    m[..., 4:12, 4:12] = 0
    kw = dict(config=PixelsConfig(strength=0.6, guidance_scale=3.0), grid=10,
              cond=sdxl.condition("a cube"), uncond=sdxl.condition(""))
    a = pixels_edit(sdxl, src, [ex], [m], generator=torch.Generator().manual_seed(1), **kw)
    b = pixels_edit(sdxl, src, [ex], [m], generator=torch.Generator().manual_seed(1), **kw)
    c = pixels_edit(sdxl, src, [ex], [m], generator=torch.Generator().manual_seed(2), **kw)
    assert torch.isfinite(a.state).all() and a.state.shape == (1, 4, 8, 8)
    assert torch.equal(a.state, b.state) and not torch.equal(a.state, c.state)
    assert a.masks.shape == (len(a.timesteps), 1, 8, 8)
