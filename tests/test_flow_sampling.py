"""The flow-matching solver behind the one sampling loop, against diffusers' own scheduler and
pipeline (tiny SD3, float32 and float64)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from flow_models import gen, rel, write_sd3

from diffgeo.backbones import load_backbone
from diffgeo.errors import InputError
from diffgeo.sampling import Grid, Guidance, ascend, invert, sample
from diffgeo.sampling.flow import (
    FlowRule,
    eps_from_velocity,
    flow_noised,
    flow_step,
    x0_from_velocity,
)

DYNAMIC = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
               max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {"shift": write_sd3(root / "sd3", t5=False),
            "dynamic": write_sd3(root / "sd3-dyn", t5=False, scheduler=DYNAMIC)}


@pytest.fixture(scope="module")
def pipes(folders):
    """The oracles: diffusers' own pipelines, loaded by diffusers."""
    return {k: StableDiffusion3Pipeline.from_pretrained(v, text_encoder_3=None, tokenizer_3=None)
            for k, v in folders.items()}


@pytest.fixture(scope="module")
def bb(folders):
    return load_backbone(folders["shift"])


@pytest.fixture(scope="module")
def bb64(folders):
    return load_backbone(folders["shift"], dtype="float64")


@pytest.mark.parametrize("kind", ["shift", "dynamic"])
@pytest.mark.parametrize("steps", [1, 5])
def test_grid_is_the_schedulers_and_generation_equals_the_sd3_pipeline(folders, pipes, kind,
                                                                      steps):
    """The strongest oracle: StableDiffusion3Pipeline itself (its mu, its timesteps, its
    scheduler.step loop) from the same starting latents, guided and unguided."""
    pipe = pipes[kind]
    b = load_backbone(folders[kind])
    g = Grid.for_model(b, steps)
    ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    mu = b.grid_rule.mu()
    assert (mu is None) == (kind == "shift")
    ref.set_timesteps(steps, mu=mu)
    assert list(g.timesteps) == sorted(float(t) for t in ref.sigmas[:-1].double() * 1000)
    assert torch.allclose(torch.tensor(list(g.timesteps)), ref.timesteps.flip(0))
    x = torch.randn(1, *b.state_shape, generator=gen(0))
    for scale in (1.0, 3.0):
        out = pipe("a cat", latents=x.clone(), num_inference_steps=steps, guidance_scale=scale,
                   output_type="latent").images
        cond = b.condition("a cat")
        guide = Guidance(scale, b.condition("")) if scale > 1 else None
        ours = sample(b, x, g, cond=cond, guidance=guide)
        assert ours.timesteps[-1] is None and len(ours.states) == steps + 1
        assert rel(ours.last, out) <= 1e-6, (scale, rel(ours.last, out))


def test_generation_equals_the_scheduler_step_loop_at_every_state(bb):
    sched = FlowMatchEulerDiscreteScheduler.from_config(bb.pipe.scheduler.config)
    sched.set_timesteps(6)
    cond = bb.condition("a dog")
    x = torch.randn(2, *bb.state_shape, generator=gen(1))
    lat, states = x.clone(), [x.clone()]
    for t in sched.timesteps:
        v = bb.transformer(hidden_states=lat, timestep=t.expand(2),
                           encoder_hidden_states=cond.expand(2).encoder_hidden_states,
                           pooled_projections=cond.expand(2).added["pooled_projections"],
                           return_dict=False)[0]
        lat = sched.step(v, t, lat).prev_sample
        states.append(lat)
    ours = sample(bb, x, Grid.for_model(bb, 6), cond=cond)
    for a, b in zip(ours.states, states, strict=True):
        assert rel(a, b) <= 1e-6


def test_conversions_are_the_schedulers_formulas(bb):
    sched = FlowMatchEulerDiscreteScheduler.from_config(bb.pipe.scheduler.config)
    sched.set_timesteps(5)
    x0 = torch.randn(1, *bb.state_shape, generator=gen(2))
    noise = torch.randn(x0.shape, generator=gen(3))
    t = sched.timesteps[2:3]
    sigma = float(sched.sigmas[2])
    xt = flow_noised(x0, noise, sigma)
    assert rel(xt, sched.scale_noise(x0, t, noise)) <= 1e-7
    v = bb.velocity(xt, float(t), None)
    # stochastic_sampling's x0 in FlowMatchEulerDiscreteScheduler.step
    assert rel(x0_from_velocity(xt, v, sigma), xt - sched.sigmas[2] * v) <= 1e-7
    eps = bb.eps(xt, float(t), None)
    assert rel(eps, eps_from_velocity(xt, v, sigma)) <= 1e-7
    # (x̂0, ε̂) re-noised at σ is x again, and v = ε̂ − x̂0
    assert rel(flow_noised(x0_from_velocity(xt, v, sigma), eps, sigma), xt) <= 1e-6
    assert rel(eps - x0_from_velocity(xt, v, sigma), v) <= 1e-6
    # the asymmetric step with equal velocities is the plain step, bit for bit
    assert torch.equal(flow_step(xt, v, sigma, 0.2, v_x0=v), flow_step(xt, v, sigma, 0.2))
    v2 = torch.randn(v.shape, generator=gen(4))
    asym = flow_step(xt, v, sigma, 0.2, v_x0=v2)
    form = 0.8 * x0_from_velocity(xt, v2, sigma) + 0.2 * eps_from_velocity(xt, v, sigma)
    assert rel(asym, form) <= 1e-6


def test_exact_inversion_round_trip_float64(bb64):
    g = Grid.for_model(bb64, 8)
    cond = bb64.condition("a cat")
    x0 = torch.randn(1, *bb64.state_shape, generator=gen(5), dtype=torch.float64)
    plain = invert(bb64, x0, g.top, g, cond)
    exact = invert(bb64, x0, g.top, g, cond, exact=True, tol=1e-13, max_iter=200)
    back_plain = sample(bb64, plain.last, g, cond=cond).last
    back = sample(bb64, exact.last, g, cond=cond).last
    assert max(exact.residuals) <= 1e-13
    assert rel(back, x0) <= 1e-11
    assert rel(back_plain, x0) > 1e3 * rel(back, x0)   # plain inversion is only approximate
    # plain inversion steps with v at the state they start from and the level they reach
    x1 = flow_step(x0, bb64.velocity(x0, g.bottom, cond), 0.0, g.sigma(g.bottom))
    assert torch.equal(plain.states[1], x1)


def test_ascend_and_sample_walk_the_same_levels(bb):
    g = Grid.for_model(bb, 4)
    x = torch.randn(1, *bb.state_shape, generator=gen(6))
    up = ascend(bb, x, g)
    down = sample(bb, up.last, g)
    assert up.timesteps == [None, *g.timesteps]
    assert down.timesteps == [*reversed(g.timesteps), None]
    mid = g.timesteps[1]
    part = sample(bb, up.last, g, stop=mid)
    assert part.timesteps[-1] == mid


def test_flow_grid_levels_and_their_checks(bb):
    g = Grid.for_model(bb, 10)
    assert g.flow and all(isinstance(t, float) for t in g.timesteps)
    assert g.sigma(None) == 0.0 and g.sigma(g.top) == 1.0
    assert g.nearest(700) in g.timesteps
    t = g.timesteps[3]
    assert g.check(round(t, 12)) == t           # a printed τ names its level
    assert g.check(t + 0.3) == t                # a number names the level nearest to it
    with pytest.raises(InputError, match="outside the model times 0..1000"):
        g.check(1000.5)
    with pytest.raises(InputError, match="DDPM quantity"):
        g.alpha_bar(t)
    with pytest.raises(InputError, match="DDIM options"):
        sample(bb, torch.zeros(1, *bb.state_shape), g, eta=0.5, generator=gen(0))
    with pytest.raises(InputError, match="DDPM grid settings"):
        Grid.for_model(bb, 10, spacing="leading")
    again = Grid.from_dict(bb, g.up_to(t).to_dict())
    assert again == g.up_to(t) and again.sigma(t) == g.sigma(t)
    rule = FlowRule.from_config(dict(bb.pipe.scheduler.config), 4)
    other = Grid(g.timesteps, 10, rule, bb.alphas_cumprod)
    with pytest.raises(InputError, match="another model's flow schedule"):
        Grid.resolve(bb, other)
    with pytest.raises(InputError, match="stochastic_sampling"):
        FlowRule.from_config({"stochastic_sampling": True}, 4)
