"""The SD3 adapter: loading (folder and pipeline object), conditioning, the h split, the token
grid, derivatives through joint attention against float64 central differences."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from flow_models import (
    T_EVAL,
    check_h_split,
    check_state_derivatives,
    gen,
    rel,
    richardson,
    write_sd3,
)

from diffgeo.backbones import load_backbone
from diffgeo.backbones.sd3 import SD3Backbone
from diffgeo.errors import InputError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3", t5=True, num_layers=3)


@pytest.fixture(scope="module")
def bb(folder):
    return load_backbone(folder)


@pytest.fixture(scope="module")
def bb64(folder):
    return load_backbone(folder, dtype="float64")


def test_folder_and_pipeline_object_load_the_same_model(folder, bb):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    from_pipe = load_backbone(pipe)
    assert isinstance(from_pipe, SD3Backbone) and from_pipe.transformer is pipe.transformer
    assert from_pipe.grid_rule == bb.grid_rule
    x = torch.randn(2, *bb.state_shape, generator=gen(0))
    c = bb.condition("a red cat")
    assert torch.equal(bb.velocity(x, T_EVAL, c), from_pipe.velocity(x, T_EVAL, c))
    s = bb.summary()
    assert s.prediction_type == "flow" and s.state_shape == (4, 8, 8)
    assert s.image_size == (16, 16) and s.h_shape == (16, 16)
    assert "3 blocks, h = block 0, token grid 4x4 of 4px" in s.kind


def test_conditioning_is_the_pipelines_encode_prompt(folder, bb):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    with torch.no_grad():
        pe, neg, pooled, neg_pooled = pipe.encode_prompt("a red cat", None, None,
                                                         do_classifier_free_guidance=True)
    c, u = bb.condition("a red cat"), bb.condition("")
    assert torch.equal(c.encoder_hidden_states, pe)
    assert torch.equal(c.added["pooled_projections"], pooled)
    assert torch.equal(u.encoder_hidden_states, neg)
    assert torch.equal(u.added["pooled_projections"], neg_pooled)
    with pytest.raises(InputError, match="prompt only"):
        bb.condition("x", negative="y")


@pytest.mark.parametrize("block", [0, 1, 2])
def test_eps_from_unmodified_h_is_eps_and_h_is_the_blocks_image_tokens(folder, block):
    b = load_backbone(StableDiffusion3Pipeline.from_pretrained(folder))
    x, c, enc = check_h_split(b, block, seed=1)
    assert b.blocks[block] is b.transformer.transformer_blocks[block]
    # an edited h changes ε (a constant shift would not: every block LayerNorms its tokens)
    dh = 0.1 * torch.randn(enc.h.shape, generator=gen(7))
    bump = b.eps_from_h(x, T_EVAL, enc.h + dh, c, encoded=enc)
    assert rel(bump, b.eps(x, T_EVAL, c)) > 1e-4
    with pytest.raises(InputError, match="h_block must be an integer in 0..2"):
        SD3Backbone(b.pipe, h_block=3)


def test_token_region_covers_patch_times_vae_factor_pixels(bb):
    assert bb.token_pixels == 4 and bb.token_grid == (4, 4)
    m = torch.zeros(16, 16)
    m[4:8, 8:12] = 1.0    # exactly token (1, 2)
    m[0:2, 0:4] = 1.0     # half of token (0, 0)
    r = bb.token_region(m)
    assert r.shape == (1, 16, 1)
    expect = torch.zeros(16)
    expect[1 * 4 + 2] = 1.0
    expect[0] = 0.5
    assert torch.equal(r.flatten(), expect)
    # the state-grid region of the same mask (the latent is the vae factor finer)
    assert bb.state_region(m).shape == (1, 1, 8, 8)


@pytest.mark.parametrize("output", ["eps", "h"])
def test_float64_jvp_and_vjp_through_joint_attention(bb64, output):
    check_state_derivatives(bb64, output, seeds=(2, 3, 4))


def test_derivative_with_respect_to_h_matches_differences(bb64):
    x = torch.randn(1, *bb64.state_shape, generator=gen(5), dtype=torch.float64)
    c = bb64.condition("a cat")
    enc = bb64.encode(x, T_EVAL, c)
    dh = torch.randn(enc.h.shape, generator=gen(6), dtype=torch.float64)

    def f(h):
        return bb64.eps_from_h(x, T_EVAL, h, c, encoded=enc)

    with bb64.derivative_mode():
        _, jv = torch.func.jvp(f, (enc.h,), (dh,))
    assert rel(jv, richardson(f, enc.h, dh)) <= 1e-9


def test_time_is_a_model_time_in_0_T(bb):
    x = torch.zeros(1, *bb.state_shape)
    with pytest.raises(InputError, match=r"t must lie in \[0, 1000\]"):
        bb.eps(x, 1000.5)
    with pytest.raises(InputError, match="model time"):
        bb.eps(x, "500")
    assert torch.equal(bb.eps(x, 500), bb.eps(x, 500.0))
