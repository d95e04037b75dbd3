"""The sampling core: grids from scheduler configs, guidance, the loop's hooks."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffgeo import sampling
from diffgeo.errors import InputError
from diffgeo.sampling import Grid, GridRule, Guidance


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                             ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 7, 10, 50])
def test_grid_timesteps_equal_ddim_scheduler(pixel_bb, spacing, offset, n):
    g = Grid.for_model(pixel_bb, n, spacing=spacing, steps_offset=offset)
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing,
                          steps_offset=offset)
    sched.set_timesteps(n)
    assert list(g.timesteps) == sorted(sched.timesteps.tolist())
    assert g.rule == GridRule(spacing, offset, True)


def test_grid_rule_is_read_from_the_scheduler_config(pixel_bb, sd_bb):
    assert pixel_bb.grid_rule == GridRule("leading", 0, True)
    assert sd_bb.grid_rule == GridRule("leading", 1, False)
    assert Grid.for_model(sd_bb, 50).timesteps[:3] == (1, 21, 41)


def test_grid_round_trips_through_its_record(sd_bb):
    g = Grid.for_model(sd_bb, 20).up_to(501)
    back = Grid.from_dict(sd_bb, g.to_dict())
    assert back == g and back.clean_alpha_bar == g.clean_alpha_bar
    with pytest.raises(InputError, match="not a recorded grid"):
        Grid.from_dict(sd_bb, {"timesteps": [1]})
    with pytest.raises(InputError, match="not on this model's grid"):
        Grid.from_dict(sd_bb, dict(g.to_dict(), timesteps=[2, 3]))


def test_grid_of_another_schedule_is_refused(pixel_bb, sd_bb):
    x = torch.zeros(1, *pixel_bb.state_shape)
    with pytest.raises(InputError, match="another model's noise schedule"):
        sampling.invert(pixel_bb, x, 901, Grid.for_model(sd_bb, 10))


def test_grid_refuses_bad_settings(pixel_bb):
    with pytest.raises(InputError, match="steps must be an integer in 1..1000, got 2.5"):
        Grid.for_model(pixel_bb, 2.5)
    with pytest.raises(InputError, match="steps_offset must be an integer >= 0"):
        Grid.for_model(pixel_bb, 10, steps_offset=-1)
    with pytest.raises(InputError, match="moves the 10-step grid outside 0..999"):
        Grid.for_model(pixel_bb, 10, steps_offset=100)
    with pytest.raises(InputError, match=r"t=555 is not on the 10-step leading grid .*"
                                         r"nearest grid timesteps: \[500, 600\]"):
        Grid.for_model(pixel_bb, 10).up_to(555)


# ------------------------------------------------------------------------------ guidance
def test_guidance_is_uncond_plus_scale_times_the_difference(sd_bb):
    """ε = ε(∅) + s·(ε(c) − ε(∅)); with cond and uncond swapped the result would be
    ε(c) + s·(ε(∅) − ε(c)), which this test tells apart (s = 3, ε(c) ≠ ε(∅))."""
    x = torch.randn(1, *sd_bb.state_shape, generator=gen(0))
    cond, uncond = sd_bb.condition("a red cube"), sd_bb.condition("")
    with torch.no_grad():
        e_c, e_u = sd_bb.eps(x, 501, cond), sd_bb.eps(x, 501, uncond)
        guided = sampling.eps_model(sd_bb, cond, Guidance(3.0, uncond))(x, 501)
    assert rel(e_c, e_u) > 1e-3
    assert torch.allclose(guided, e_u + 3.0 * (e_c - e_u), atol=1e-6)
    assert rel(guided, e_c + 3.0 * (e_u - e_c)) > 1e-2
    # scale 1 is the conditional ε itself
    with torch.no_grad():
        assert torch.equal(sampling.eps_model(sd_bb, cond, Guidance(1.0, uncond))(x, 501), e_c)


def test_guided_generation_steps_with_the_guided_eps(sd_bb):
    cond, uncond = sd_bb.condition("a red cube"), sd_bb.condition("")
    g = Grid.for_model(sd_bb, 5)
    x = torch.randn(1, *sd_bb.state_shape, generator=gen(1))
    traj = sampling.generate(sd_bb, x, g.top, g, cond, guidance=Guidance(2.5, uncond))
    state = x
    with torch.no_grad():
        for t_from, t_to in zip(reversed(g.levels()[1:]), reversed(g.levels()[:-1]),
                                strict=True):
            e_u, e_c = sd_bb.eps(state, t_from, uncond), sd_bb.eps(state, t_from, cond)
            state = sampling.ddim_step(state, e_u + 2.5 * (e_c - e_u), g.alpha_bar(t_from),
                                       g.alpha_bar(t_to))
    assert torch.allclose(traj.last, state, atol=1e-6)
    plain = sampling.generate(sd_bb, x, g.top, g, cond)
    assert rel(plain.last, traj.last) > 1e-3


def test_guidance_refuses_bad_settings(pixel_bb, sd_bb):
    with pytest.raises(InputError, match="guidance_scale must be a number >= 1"):
        Guidance(0.5, sd_bb.condition(""))
    with pytest.raises(InputError, match="needs a conditional model"):
        sampling.eps_model(pixel_bb, None, Guidance(2.0, sd_bb.condition("")))


# ------------------------------------------------------------------------------ hooks
def test_hooks_see_every_step_in_order_and_replace_the_state(pixel_bb):
    g = Grid.for_model(pixel_bb, 10).up_to(400)
    x = torch.randn(1, *pixel_bb.state_shape, generator=gen(2))
    seen: list[tuple] = []

    def before(i, t, state):
        seen.append(("before", i, t))
        return state

    def after(step):
        seen.append(("after", step.i, step.t_from, step.t_to))
        # redo from the same state is the same step
        assert torch.equal(step.redo(step.x_from), step.x_to)
        return step.x_to * 0.5 if step.t_to == 200 else step.x_to

    traj = sampling.sample(pixel_bb, x, g, before_step=before, on_step=after)
    assert seen == [("before", 0, 400), ("after", 0, 400, 300), ("before", 1, 300),
                    ("after", 1, 300, 200), ("before", 2, 200), ("after", 2, 200, 100),
                    ("before", 3, 100), ("after", 3, 100, 0), ("before", 4, 0),
                    ("after", 4, 0, None)]
    plain = sampling.walk(pixel_bb, x, 400, 200, g)
    assert torch.equal(traj.at(200), plain[200] * 0.5)


def test_walk_down_stops_at_its_target(pixel_bb):
    g = Grid.for_model(pixel_bb, 10)
    x = torch.randn(1, *pixel_bb.state_shape, generator=gen(3))
    down = sampling.walk(pixel_bb, x, 700, 300, g)
    assert sorted(down) == [300, 400, 500, 600, 700]
    full = sampling.generate(pixel_bb, x, 700, g)
    assert torch.equal(down[300], full.at(300))
