"""Backbones: ε, h, the decoder half, features, prediction types, autodiff mode, summaries.

Every reference here is computed from the diffusers modules themselves (a hand-written encoder
pass, forward hooks on the stock ``unet(...)`` call), never from diffgeo's own helpers.

Tolerances: the same float32 arithmetic in the same order agrees bit for bit, so the "manual
pass" comparisons use 1e-6 only as slack for kernel choice; fused vs math attention differ by
float32 rounding (~1e-7 relative per attention layer): 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor

from diffgeo.backbones import Conditioning, LatentBackbone, PixelBackbone, load_backbone
from diffgeo.errors import InputError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _x(bb, batch=2, seed=0):
    return torch.randn(batch, *bb.state_shape, generator=gen(seed), dtype=bb.dtype)


def _empty_prompt_states(bb: LatentBackbone) -> torch.Tensor:
    """CLIP's last hidden state for the empty prompt, straight from transformers."""
    ids = bb.tokenizer("", padding="max_length", max_length=bb.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return bb.text_encoder(ids).last_hidden_state


def _stock_forward(bb, x, t, ehs=None):
    """The diffusers forward pass, untouched."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long) if isinstance(t, int) else t
    with torch.no_grad():
        if isinstance(bb, PixelBackbone):
            return bb.unet(x, tt).sample
        return bb.unet(x, tt, encoder_hidden_states=ehs).sample


def _with_hooks(modules, fn):
    """Run fn() and return (its result, the outputs of ``modules`` during the call)."""
    seen = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in modules]
    try:
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return result, seen


@torch.no_grad()
def _manual_h(bb, x, t: int, ehs=None) -> torch.Tensor:
    """conv_in -> down blocks -> mid block with the time embedding, written from diffusers."""
    u = bb.unet
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    emb = u.time_embedding(u.time_proj(tt).to(x.dtype))
    s = u.conv_in(x)
    for block in u.down_blocks:
        if getattr(block, "has_cross_attention", False):
            s, _ = block(hidden_states=s, temb=emb, encoder_hidden_states=ehs)
        else:
            s, _ = block(hidden_states=s, temb=emb)
    if getattr(u.mid_block, "has_cross_attention", False):
        return u.mid_block(s, emb, encoder_hidden_states=ehs)
    return u.mid_block(s, emb)


# ------------------------------------------------------------------------------ fixtures
def test_fixture_models_have_attention_and_multichannel_groupnorm(pixel_bb, sd_bb):
    for bb in (pixel_bb, sd_bb):
        mods = list(bb.unet.modules())
        assert any(isinstance(m, Attention) for m in mods)
        norms = [m for m in mods if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.num_channels // m.num_groups > 1 for m in norms)
    assert isinstance(pixel_bb, PixelBackbone) and isinstance(sd_bb, LatentBackbone)


# ------------------------------------------------------------------------------ ε and h
@pytest.mark.parametrize("name", ["pixel_bb", "sd_bb"])
def test_h_equals_a_manual_encoder_pass(name, request):
    bb = request.getfixturevalue(name)
    x = _x(bb)
    ehs = _empty_prompt_states(bb).expand(2, -1, -1) if bb.kind == "latent" else None
    want = _manual_h(bb, x, 300, ehs)
    with torch.no_grad():
        h = bb.h(x, 300)
    assert h.shape == want.shape == (2, *bb.h_shape())
    assert rel(h, want) <= 1e-6
    # and it is what the stock forward pass feeds its decoder
    _, seen = _with_hooks([bb.unet.mid_block], lambda: _stock_forward(bb, x, 300, ehs))
    assert rel(h, seen[0]) <= 1e-6


@pytest.mark.parametrize("name", ["pixel_bb", "sd_bb"])
def test_eps_equals_the_stock_unet_forward(name, request):
    bb = request.getfixturevalue(name)
    x = _x(bb, seed=1)
    ehs = _empty_prompt_states(bb).expand(2, -1, -1) if bb.kind == "latent" else None
    want = _stock_forward(bb, x, 700, ehs)
    with torch.no_grad():
        assert rel(bb.eps(x, 700), want) <= 1e-5
        # an explicit per-sample timestep tensor
        tt = torch.tensor([700, 20])
        want2 = _stock_forward(bb, x, tt, ehs)
        assert rel(bb.eps(x, tt), want2) <= 1e-5
        # inside derivative mode (math attention) too
        with bb.derivative_mode():
            assert rel(bb.eps(x, 700), want) <= 1e-5


@pytest.mark.parametrize("name", ["pixel_bb", "sd_bb"])
def test_eps_from_h_reruns_only_the_decoder(name, request):
    bb = request.getfixturevalue(name)
    x = _x(bb, seed=2)
    with torch.no_grad():
        eps = bb.eps(x, 400)
        h = bb.h(x, 400)
        assert rel(bb.eps_from_h(x, 400, h), eps) <= 1e-5
        enc = bb.encode(x, 400)
        assert rel(bb.eps_from_h(x, 400, enc.h, encoded=enc), eps) <= 1e-5
        # it really uses the h it is given
        assert rel(bb.eps_from_h(x, 400, 1.5 * h, encoded=enc), eps) > 1e-3
        with pytest.raises(InputError, match=r"h must have shape \(2, 32, "):
            bb.eps_from_h(x, 400, h[:, :4])


@pytest.mark.parametrize("name", ["pixel_bb", "sd_bb"])
def test_features_are_the_up_block_outputs(name, request):
    bb = request.getfixturevalue(name)
    x = _x(bb, seed=3)
    ehs = _empty_prompt_states(bb).expand(2, -1, -1) if bb.kind == "latent" else None
    with torch.no_grad():
        feats = bb.features(x, 250)
    _, seen = _with_hooks(list(bb.unet.up_blocks), lambda: _stock_forward(bb, x, 250, ehs))
    assert len(feats) == len(bb.unet.up_blocks) == len(seen) == 2
    for f, s in zip(feats, seen, strict=True):
        assert f.shape == s.shape
        assert rel(f, s) <= 1e-6


def test_v_prediction_backbone_converts_v_to_eps(sd_v_bb, sd_v_path):
    bb = sd_v_bb
    assert bb.prediction_type == "v_prediction"
    x = _x(bb, seed=4)
    tt = torch.tensor([100, 700])  # two noise levels in one batch
    ehs = _empty_prompt_states(bb).expand(2, -1, -1)
    v = _stock_forward(bb, x, tt, ehs)
    # alpha_bar from diffusers' own (float32) schedule: ~1e-6 relative from diffgeo's float64.
    ab = DDIMScheduler.from_pretrained(sd_v_path / "scheduler").alphas_cumprod.double()[tt]
    ab = ab.reshape(-1, 1, 1, 1)
    want = ab.sqrt() * v.double() + (1 - ab).sqrt() * x.double()
    with torch.no_grad():
        assert rel(bb.eps(x, tt), want) <= 1e-5
        # eps_from_h converts too
        assert rel(bb.eps_from_h(x, tt, bb.h(x, tt)), want) <= 1e-5
    # and the raw output is not ε: the conversion matters
    assert rel(v, want) > 1e-2


def test_prompt_conditioning_reaches_the_unet(sd_bb):
    x = _x(sd_bb, seed=5)
    cond = sd_bb.condition("a red cube")
    assert cond.prompt == "a red cube" and cond.encoder_hidden_states.shape == (1, 16, 16)
    with torch.no_grad():
        e_prompt = sd_bb.eps(x, 500, cond)
        e_empty = sd_bb.eps(x, 500)
        assert rel(e_prompt, e_empty) > 1e-4
        # a batch-1 conditioning is broadcast over the batch
        for i in range(2):
            assert rel(e_prompt[i:i + 1], sd_bb.eps(x[i:i + 1], 500, cond)) <= 1e-5
        # condition() is the same as handing the text states over ourselves
        assert rel(e_empty, sd_bb.eps(x, 500, Conditioning(_empty_prompt_states(sd_bb)))) <= 1e-6


# ------------------------------------------------------------------------------ autodiff mode
@pytest.mark.parametrize("name", ["pixel_bb", "sd_bb"])
def test_derivative_mode_restores_processors_and_hooks(name, request):
    bb = request.getfixturevalue(name)
    modules = [bb.unet] + ([bb.vae] if bb.kind == "latent" else [])
    attns = [m for root in modules for m in root.modules() if isinstance(m, Attention)]
    norms = [m for root in modules for m in root.modules() if isinstance(m, torch.nn.GroupNorm)]
    before = [a.processor for a in attns]
    assert not any(isinstance(p, AttnProcessor) for p in before)  # fast kernels by default
    assert all(len(n._forward_pre_hooks) == 0 for n in norms)
    x = _x(bb, seed=3)
    with bb.derivative_mode():
        # The model's own processors stay; attention runs on the math SDPA kernel, which has
        # forward AD (the fused CPU kernel has none), so a JVP goes through.
        assert all(a.processor is p for a, p in zip(attns, before, strict=True))
        assert all(len(n._forward_pre_hooks) == 1 for n in norms)
        _, jv = torch.func.jvp(lambda z: bb.eps(z, 500), (x,), (torch.ones_like(x),))
        assert torch.isfinite(jv).all()
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(lambda z: bb.eps(z, 500), (x,), (torch.ones_like(x),))
    assert all(a.processor is p for a, p in zip(attns, before, strict=True))
    assert all(len(n._forward_pre_hooks) == 0 for n in norms)
    # also when the block raises
    with pytest.raises(RuntimeError, match="boom"), bb.derivative_mode():
        raise RuntimeError("boom")
    assert all(a.processor is p for a, p in zip(attns, before, strict=True))
    assert all(len(n._forward_pre_hooks) == 0 for n in norms)


@pytest.mark.parametrize("name", [
    "pixel_bb64",
    "sd_bb64",
])
def test_derivative_mode_keeps_float64_precision(name, request):
    bb = request.getfixturevalue(name)
    x = _x(bb, seed=6)
    with torch.no_grad():
        plain = bb.eps(x, 500)
        with bb.derivative_mode():
            math = bb.eps(x, 500)
    # Two float64 evaluations of the same function in different kernels: ~1e-15 (measured on
    # the SD U-Net: 1e-15; the pixel U-Net: 1.8e-8).
    assert rel(math, plain) <= 1e-12


def test_h_path_honours_center_input_sample(tmp_path):
    from diffusers import DDPMScheduler

    from diffgeo.train import MODEL_PRESETS

    with torch.random.fork_rng():
        torch.manual_seed(3)
        from diffusers import UNet2DModel

        unet = UNet2DModel(**dict(MODEL_PRESETS["tiny-16"], center_input_sample=True))
    unet.save_pretrained(tmp_path)
    DDPMScheduler().save_pretrained(tmp_path)
    bb = load_backbone(tmp_path)
    x = _x(bb, seed=7)
    with torch.no_grad():
        assert rel(bb.eps_from_h(x, 500, bb.h(x, 500)), bb.eps(x, 500)) <= 1e-5


# ------------------------------------------------------------------------------ bad inputs
def test_float_timesteps_are_refused(pixel_bb, sd_bb):
    for bb in (pixel_bb, sd_bb):
        x = _x(bb, batch=1)
        with pytest.raises(InputError, match=r"t must be an integer timestep, got float 500\.0"):
            bb.eps(x, 500.0)
        with pytest.raises(InputError, match=r"t must be an integer timestep, got a "
                                             r"torch\.float32 tensor \(float timesteps are "
                                             r"refused"):
            bb.eps(x, torch.tensor(500.0))
        with pytest.raises(InputError, match=r"t must be an integer timestep, got True"):
            bb.h(x, True)
    # integer-valued alternatives are fine
    x = _x(pixel_bb, batch=1)
    with torch.no_grad():
        a = pixel_bb.eps(x, 500)
        assert torch.equal(pixel_bb.eps(x, torch.tensor(500)), a)
        assert torch.equal(pixel_bb.eps(x, torch.tensor([500], dtype=torch.int32)), a)


def test_out_of_range_timesteps_are_refused(pixel_bb):
    x = _x(pixel_bb)
    with pytest.raises(InputError, match=r"t must lie in 0\.\.999, got \[1000, 1000\]"):
        pixel_bb.eps(x, 1000)
    with pytest.raises(InputError, match=r"t must lie in 0\.\.999, got \[-1, -1\]"):
        pixel_bb.h(x, -1)
    with pytest.raises(InputError, match=r"t must lie in 0\.\.999, got \[3, 2000\]"):
        pixel_bb.eps(x, torch.tensor([3, 2000]))
    with pytest.raises(InputError, match=r"t has 3 entries for a batch of 2"):
        pixel_bb.eps(x, torch.tensor([1, 2, 3]))


def test_wrong_state_shapes_are_refused(pixel_bb, sd_bb):
    with pytest.raises(InputError, match=r"x must have shape \(B, 3, 16, 16\), got \(1, 3, 8, 8\)"):
        pixel_bb.eps(torch.zeros(1, 3, 8, 8), 10)
    with pytest.raises(InputError, match=r"x must have shape \(B, 3, 16, 16\), got \(3, 16, 16\)"):
        pixel_bb.h(torch.zeros(3, 16, 16), 10)
    with pytest.raises(InputError, match=r"x must have shape \(B, 4, 8, 8\), got \(1, 3, 16, 16\)"):
        sd_bb.eps(torch.zeros(1, 3, 16, 16), 10)
    with pytest.raises(InputError, match=r"x must be a torch\.Tensor, got list"):
        pixel_bb.features([0.0], 10)
    with pytest.raises(InputError, match=r"image must have shape \(B, 3, 16, 16\), "
                                         r"got \(1, 3, 8, 8\)"):
        sd_bb.to_state(torch.zeros(1, 3, 8, 8))
    with pytest.raises(InputError, match=r"state must have shape \(B, 4, 8, 8\)"):
        sd_bb.to_image(torch.zeros(1, 4, 16, 16))


def test_prompt_for_an_unconditional_model_is_refused(pixel_bb):
    with pytest.raises(InputError, match=r"this pixel model is unconditional: it takes no prompt"):
        pixel_bb.condition("a red cube")
    assert pixel_bb.condition() is None and pixel_bb.condition("") is None


def test_conditioning_batch_mismatch_is_refused(sd_bb):
    cond = Conditioning(torch.zeros(3, 16, 16))
    with pytest.raises(InputError, match=r"cond: batch of 3 cannot be broadcast to a batch of 2"):
        sd_bb.eps(_x(sd_bb), 10, cond)


# ------------------------------------------------------------------------------ summaries
def test_summaries(pixel_bb, bare_bb, sd_bb, sd_v_bb, pixel_bb64, sd_bb64, pixel_path,
                   bare_unet_path, sd_path):
    def nparams(*mods):
        return sum(p.numel() for m in mods for p in m.parameters())

    expected = {
        "pixel": (pixel_bb, "pixel", (3, 16, 16), (32, 8, 8), "epsilon", "float32", False),
        "bare": (bare_bb, "pixel", (3, 16, 16), (32, 8, 8), "epsilon", "float32", False),
        "sd": (sd_bb, "latent", (4, 8, 8), (32, 4, 4), "epsilon", "float32", True),
        "sd-v": (sd_v_bb, "latent", (4, 8, 8), (32, 4, 4), "v_prediction", "float32", True),
        "pixel64": (pixel_bb64, "pixel", (3, 16, 16), (32, 8, 8), "epsilon", "float64", False),
        "sd64": (sd_bb64, "latent", (4, 8, 8), (32, 4, 4), "epsilon", "float64", True),
    }
    for key, (bb, kind, state, h, pred, dtype, conditional) in expected.items():
        s = bb.summary()
        assert s.kind == kind, key
        assert s.image_size == (16, 16), key
        assert s.state_shape == state, key
        assert s.h_shape == h, key
        with torch.no_grad():  # h_shape agrees with an actual bottleneck
            assert tuple(bb.h(_x(bb, batch=1), 999).shape[1:]) == h, key
        assert s.num_train_timesteps == 1000, key
        assert s.prediction_type == pred, key
        assert s.dtype == dtype, key
        assert s.device == "cpu", key
        assert s.conditional is conditional, key
        assert any(line == f"kind: {kind}" for line in s.lines())
        if kind == "pixel":
            assert s.parameters == nparams(bb.unet)
        else:
            assert s.parameters == nparams(bb.unet, bb.vae, bb.text_encoder)
    assert pixel_bb.summary().name == str(pixel_path)
    assert bare_bb.summary().name == str(bare_unet_path)
    assert sd_bb.summary().name == str(sd_path)


# ------------------------------------------------------------------------------ latent states
def test_latent_state_image_round_shapes_and_determinism(sd_bb):
    img = torch.rand(2, 3, 16, 16, generator=gen(8)) * 2 - 1
    with torch.no_grad():
        s1 = sd_bb.to_state(img)
        s2 = sd_bb.to_state(img)
        assert s1.shape == (2, 4, 8, 8)
        assert torch.equal(s1, s2)  # the posterior mean, not a sample
        # the posterior mean times the VAE's scaling factor, from diffusers directly
        dist = sd_bb.vae.encode(img).latent_dist
        assert rel(s1, dist.mean * sd_bb.vae.config.scaling_factor) <= 1e-6
        assert rel(dist.sample(generator=gen(9)), dist.mean) > 1e-3  # sampling would differ
        out = sd_bb.to_image(s1)
        assert out.shape == (2, 3, 16, 16)
        assert float(out.min()) >= -1 and float(out.max()) <= 1
        want = sd_bb.vae.decode(s1 / sd_bb.vae.config.scaling_factor).sample.clamp(-1, 1)
        assert rel(out, want) <= 1e-6


def test_pixel_state_is_the_image(pixel_bb):
    img = torch.rand(1, 3, 16, 16, generator=gen(10)) * 2 - 1
    assert torch.equal(pixel_bb.to_state(img), img)
    assert torch.equal(pixel_bb.to_image(img), img)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_eps_conversion_keeps_float32_precision_near_t0(pixel_path, prediction_type):
    """ε from an x̂0- or v-prediction is formed with float64 coefficients: near t = 0,
    1 − ᾱ cast to float32 first would put ε ~1e-4 off (measured 8e-5 at t <= 5 for x̂0)."""
    bb = load_backbone(pixel_path)
    bb.prediction_type = prediction_type
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *bb.state_shape, generator=g)
    out = torch.randn(4, *bb.state_shape, generator=g)
    tt = torch.tensor([0, 1, 3, 5])
    a = bb.alphas_cumprod[tt].reshape(-1, 1, 1, 1)
    xd, od = x.double(), out.double()
    if prediction_type == "sample":
        want = (xd - a.sqrt() * od) / (1 - a).sqrt()
    else:
        want = a.sqrt() * od + (1 - a).sqrt() * xd
    got = bb.to_eps(out, x, tt)
    assert got.dtype == torch.float32
    # float32 rounding of the result and of its two terms only: a few units of 2^-24 (measured
    # 4e-8 for both); with 1 − ᾱ formed in float32 it was 7e-5 (x̂0) and 7e-7 (v).
    assert rel(got.double(), want) <= 2e-7
