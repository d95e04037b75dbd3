"""The FLUX adapter: generation equals FluxPipeline (packed latents, ids, embedded guidance,
dynamic shifting), the h split over double- and single-stream blocks, the token grid, and
float64 derivatives / exact inversion with the rotary embedding in the input dtype."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers import transformer_flux
from flow_models import T_EVAL, check_h_split, check_state_derivatives, gen, rel, write_flux

from diffgeo.backbones import load_backbone
from diffgeo.backbones.flux import FluxBackbone, rope_in_input_dtype
from diffgeo.errors import InputError
from diffgeo.sampling import Grid, Guidance, invert, sample


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"distilled": write_flux(root / "flux"),
            "plain": write_flux(root / "flux-cfg", guidance_embeds=False)}


@pytest.fixture(scope="module")
def bb(folders):
    return load_backbone(folders["distilled"])


@pytest.fixture(scope="module")
def bb64(folders):
    return load_backbone(folders["distilled"], dtype="float64")


@pytest.mark.parametrize("kind", ["distilled", "plain"])
def test_generation_equals_the_flux_pipeline(folders, kind):
    pipe = FluxPipeline.from_pretrained(folders[kind])
    b = load_backbone(folders[kind])
    assert (b.embedded_guidance is not None) == (kind == "distilled")
    x = torch.randn(1, *b.state_shape, generator=gen(0))
    B, C, H, W = x.shape
    g = Grid.for_model(b, 4)
    cond = b.condition("a cat")
    if kind == "distilled":   # embedded guidance 3.5, FluxPipeline's default
        out = pipe("a cat", latents=pipe._pack_latents(x, B, C, H, W), num_inference_steps=4,
                   height=16, width=16, output_type="latent").images
        ours = sample(b, x, g, cond=cond).last
    else:                     # true classifier-free guidance against the empty prompt
        out = pipe("a cat", negative_prompt="", true_cfg_scale=4.0,
                   latents=pipe._pack_latents(x, B, C, H, W), num_inference_steps=4,
                   height=16, width=16, output_type="latent").images
        ours = sample(b, x, g, cond=cond, guidance=Guidance(4.0, b.condition(""))).last
    assert rel(ours, pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)) <= 1e-6


def test_pipeline_object_and_summary(folders, bb):
    pipe = FluxPipeline.from_pretrained(folders["distilled"])
    b = load_backbone(pipe)
    assert isinstance(b, FluxBackbone) and b.transformer is pipe.transformer
    x = torch.randn(1, *bb.state_shape, generator=gen(1))
    assert torch.equal(b.velocity(x, T_EVAL, None), bb.velocity(x, T_EVAL, None))
    s = bb.summary()
    assert s.state_shape == (4, 8, 8) and s.image_size == (16, 16) and s.h_shape == (16, 16)
    assert s.prediction_type == "flow"
    assert "3 blocks, h = double-stream block 0, token grid 4x4 of 4px" in s.kind
    assert "embedded guidance 3.5" in s.kind
    assert bb.grid_rule.pipeline_sigmas == "flux" and bb.grid_rule.image_seq_len == 16
    with pytest.raises(InputError, match="multiple of 4"):
        FluxBackbone(pipe, resolution=18)


@pytest.mark.parametrize("block", [0, 1, 2])
def test_eps_from_unmodified_h_is_eps_over_both_block_kinds(folders, block):
    b = load_backbone(folders["distilled"])
    check_h_split(b, block, seed=2)
    assert b.describe_h_block() == ("double-stream block 0" if block == 0
                                    else f"single-stream block {block - 1}")


def test_token_region_on_the_packed_grid(bb):
    m = torch.zeros(16, 16)
    m[12:16, 0:4] = 1.0
    r = bb.token_region(m).flatten()
    assert r[12] == 1.0 and float(r.sum()) == 1.0


def test_rope_patch_is_scoped_and_float64_reaches_round_off(bb64):
    original = transformer_flux.apply_rotary_emb
    with rope_in_input_dtype(bb64.transformer), rope_in_input_dtype(bb64.transformer):
        assert transformer_flux.apply_rotary_emb is not original
    assert transformer_flux.apply_rotary_emb is original
    assert "forward" not in vars(bb64.transformer.pos_embed)
    x = torch.randn(1, *bb64.state_shape, generator=gen(3), dtype=torch.float64)
    c = bb64.condition("a cat")
    # diffusers' own float32 rotary on a float64 model is float32-accurate only
    with torch.no_grad():
        ours = bb64.velocity(x, T_EVAL, c)
        theirs = bb64.pipe._unpack_latents(bb64.transformer(
            hidden_states=bb64._pack(x), return_dict=False,
            **bb64._inputs(x, bb64.timesteps(T_EVAL, 1), c))[0], 16, 16, 2)
    assert 1e-12 < rel(theirs, ours) < 1e-5
    g = Grid.for_model(bb64, 6)
    inv = invert(bb64, x, g.top, g, c, exact=True, tol=1e-13, max_iter=200)
    assert rel(sample(bb64, inv.last, g, cond=c).last, x) <= 1e-11


@pytest.mark.parametrize("output", ["eps", "h"])
def test_float64_jvp_and_vjp_through_rotary_joint_attention(bb64, output):
    check_state_derivatives(bb64, output, seeds=(4, 5, 6))
