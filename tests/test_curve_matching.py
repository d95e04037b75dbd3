"""Curve matching (Algorithm 1): gradient oracle, fast vs faithful, localized blending."""

from __future__ import annotations

import sys

import pytest
import torch

from diffgeo import sampling
from diffgeo.backbones import load_backbone
from diffgeo.curves import pixel_direction
from diffgeo.editing import tasks
from diffgeo.editing.curve_matching import (
    FAST_PIXELS_PER_ITERATION,
    FAST_REFRESH_DRIFT,
    CurveMatchingConfig,
    PathCache,
    blended_decode,
    curve_matching,
    full_path,
    match_outside_statistics,
    observe_iterations,
    paste_outside,
    rates_batch,
    walk_to,
)
from diffgeo.errors import InputError
from diffgeo.sampling import Grid


@pytest.fixture(scope="module")
def bb64(pixel_path):
    return load_backbone(pixel_path, dtype="float64")


def _image(seed=0, dtype=torch.float32):
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed),
                      dtype=dtype) * 2 - 1


REGION = torch.zeros(16, 16)
REGION[4:9, 5:11] = 1


def test_rate_gradient_matches_finite_differences(bb64):
    """d/dX_t of ‖D h_{t_k}(X_t + ΔX)[e_p]‖ — the quantity every iteration differentiates."""
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    delta = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                              dtype=torch.float64)
    v = pixel_direction(bb64, (6, 7))[None]
    z = x.clone().requires_grad_(True)
    rates_batch(bb64, z + delta, [400], v, None)[0].backward()
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = 1e-5
    with torch.no_grad():
        fd = (rates_batch(bb64, x + s * d + delta, [400], v, None)[0]
              - rates_batch(bb64, x - s * d + delta, [400], v, None)[0]) / (2 * s)
    # central differences in fp64 with s = 1e-5: truncation ~1e-10, rounding ~1e-11
    assert float((z.grad * d).sum()) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize(("pairs", "derivative"),
                         [(1, "exact"), (3, "exact"), (3, "difference")])
def test_fast_equals_faithful_when_the_path_is_refreshed_every_iteration(pixel_bb, pairs,
                                                                         derivative):
    """With the same derivative (fast mode's default is the difference, faithful's the JVP)."""
    cfg = dict(t=500, num_steps=10, iterations=4, refresh_every=1, loss="minimize", seed=3,
               localized=False, pixels_per_iteration=pairs, derivative=derivative)
    fast = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(mode="fast", **cfg))
    slow = curve_matching(pixel_bb, _image(), REGION,
                          CurveMatchingConfig(mode="faithful", **cfg))
    pairs_of = lambda res: [(s["t_k"], s["pixel"]) for h in res.history  # noqa: E731
                            for s in h["samples"]]
    assert pairs_of(fast) == pairs_of(slow)
    assert all(len(h["samples"]) == pairs for h in fast.history)
    assert torch.allclose(fast.state, slow.state, atol=1e-5)
    assert fast.losses == pytest.approx(slow.losses, rel=1e-4)


def test_refresh_drift_rewalks_when_x_t_has_moved(pixel_bb):
    """A drift tolerance below any move re-walks the path every iteration: fast mode's ΔX is
    then exact and fast equals faithful, with the same timestep draws (a re-walk leaves the
    sampling curve on the periodic schedule); an unreachable one leaves the periodic refresh
    alone."""
    cfg = dict(t=500, num_steps=10, iterations=4, loss="minimize", seed=3, localized=False,
               pixels_per_iteration=2, lr=0.1, derivative="exact")
    faithful = curve_matching(pixel_bb, _image(), REGION,
                              CurveMatchingConfig(mode="faithful", refresh_every=50, **cfg))
    drift = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(
        mode="fast", refresh_every=50, refresh_drift=1e-9, **cfg))
    assert drift.settings["drift_refreshes"] == 3 and drift.settings["refreshes"] == 0
    assert [h["rewalked"] for h in drift.history] == [False, True, True, True]
    assert faithful.settings["drift_refreshes"] == 0  # faithful's default: off
    assert torch.allclose(drift.state, faithful.state, atol=1e-5)
    assert [[s["t_k"] for s in h["samples"]] for h in drift.history] == \
        [[s["t_k"] for s in h["samples"]] for h in faithful.history]
    never = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(
        mode="fast", refresh_every=2, refresh_drift=1e9, **cfg))
    assert never.settings["refreshes"] == 1  # iteration 2 only
    assert never.settings["drift_refreshes"] == 0
    # the recorded drift is the relative move of X_t since the last refresh: zero before the
    # first step; at iteration 3 one step's move, as iteration 2's refresh took a new base
    d = [h["drift"] for h in never.history]
    assert d[0] == 0.0 and 0 < d[1] < d[2] and d[3] < d[2]
    assert drift.history[1]["drift"] > 0  # measured before that iteration's refresh


def test_refresh_drift_default_by_mode(pixel_bb):
    assert CurveMatchingConfig(mode="fast").drift_tolerance == FAST_REFRESH_DRIFT
    assert CurveMatchingConfig(mode="faithful").drift_tolerance == 0.0
    assert CurveMatchingConfig(mode="fast", refresh_drift=0).drift_tolerance == 0.0
    assert CurveMatchingConfig(mode="fast", refresh_drift=0.1).drift_tolerance == 0.1
    assert CurveMatchingConfig(mode="faithful", refresh_drift=0).drift_tolerance == 0.0
    res = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(
        t=500, num_steps=10, iterations=3, loss="minimize", localized=False, lr=0.5))
    assert res.settings["refresh_drift"] == FAST_REFRESH_DRIFT
    assert res.settings["drift_refreshes"] == sum(
        h["drift"] > FAST_REFRESH_DRIFT for h in res.history[1:]) > 0


def test_pairs_per_iteration_default_by_mode(pixel_bb):
    assert CurveMatchingConfig(mode="fast").batch == FAST_PIXELS_PER_ITERATION > 1
    assert CurveMatchingConfig(mode="faithful").batch == 1  # the paper: one pair
    assert CurveMatchingConfig(mode="faithful", pixels_per_iteration=5).batch == 5
    res = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(
        t=500, num_steps=10, iterations=2, loss="minimize", localized=False))
    assert res.settings["pixels_per_iteration"] == FAST_PIXELS_PER_ITERATION
    assert all(len(h["samples"]) == FAST_PIXELS_PER_ITERATION for h in res.history)
    h = res.history[0]
    assert h["loss"] == pytest.approx(sum(s["loss"] for s in h["samples"]) / len(h["samples"]))


def test_batched_rates_equal_single_rates_and_their_gradients(bb64):
    """One batched JVP with its own state, timestep and pixel per element is B single ones:
    values, and the gradient with respect to the shared X_t (the sum of the single ones)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 16, 16, generator=gen, dtype=torch.float64)
    deltas = 0.1 * torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    ts, pixels = [100, 400, 900], [(6, 7), (0, 15), (6, 7)]
    v = torch.stack([pixel_direction(bb64, p) for p in pixels])
    z = x.clone().requires_grad_(True)
    batched = rates_batch(bb64, z + deltas, ts, v, None)
    batched.sum().backward()
    grad_sum = torch.zeros_like(x)
    for i in range(3):
        zi = x.clone().requires_grad_(True)
        single = rates_batch(bb64, zi + deltas[i:i + 1], ts[i:i + 1], v[i:i + 1], None)
        assert float(single[0].detach()) == pytest.approx(float(batched[i].detach()),
                                                         rel=1e-10)
        single[0].backward()
        grad_sum += zi.grad
    assert torch.allclose(z.grad, grad_sum, rtol=1e-9, atol=1e-12)
    # one state broadcast to every element (expand shares its memory, which forward-mode AD
    # refuses unless copied first) gives the rates of that state materialised per element
    shared = rates_batch(bb64, x.expand(3, -1, -1, -1), ts, v, None)
    assert torch.allclose(shared, rates_batch(bb64, x.repeat(3, 1, 1, 1), ts, v, None),
                          rtol=1e-12)
    with pytest.raises(InputError, match="one timestep and one direction"):
        rates_batch(bb64, z + deltas, ts[:2], v, None)


def test_faithful_walk_covers_targets_above_and_below(pixel_bb, monkeypatch):
    x = sampling.invert(pixel_bb, _image(), 500, 10).last
    walked = walk_to(pixel_bb, x, 500, [200, 800, 500, 300], 10, None)
    path = full_path(pixel_bb, x, 500, 10, None)
    for t in (200, 300, 500, 800):
        assert torch.allclose(walked[t], path[t], atol=1e-6)
    # One walk per side that has targets, each only as far as its farthest target.
    calls = []
    module = sys.modules["diffgeo.editing.curve_matching"]
    real_walk = module.walk
    monkeypatch.setattr(module, "walk", lambda bb, x, a, b, *r: calls.append((a, b))
                        or real_walk(bb, x, a, b, *r))
    for targets, expected in (([200], [(500, 200)]), ([300, 200], [(500, 200)]),
                              ([800, 700], [(500, 800)]), ([500], []),
                              ([200, 800], [(500, 200), (500, 800)])):
        calls.clear()
        walk_to(pixel_bb, x, 500, targets, 10, None)
        assert calls == expected, targets


def test_localized_blending_restores_the_outside_exactly(pixel_bb):
    cfg = CurveMatchingConfig(t=600, num_steps=10, iterations=3, blend_every=3, t_blend=500,
                              loss="minimize", lr=0.1)
    res = curve_matching(pixel_bb, _image(), REGION, cfg)
    assert res.history[-1]["blended"]
    x_orig = sampling.invert(pixel_bb, _image(), 600, 10).last
    outside = (REGION == 0)[None, None].expand_as(x_orig)
    assert torch.equal(res.state[outside], x_orig[outside])
    assert not torch.equal(res.state, x_orig)  # the inside moved


@pytest.mark.parametrize("iterations, blend_every", [(4, 3), (2, 70)])
def test_outside_is_restored_after_the_last_iteration_too(pixel_bb, iterations, blend_every):
    """Iterations after the last periodic blend (or with none at all) must not leak outside."""
    cfg = CurveMatchingConfig(t=600, num_steps=10, iterations=iterations,
                              blend_every=blend_every, t_blend=500, loss="minimize", lr=0.1)
    res = curve_matching(pixel_bb, _image(), REGION, cfg)
    assert not res.history[-1]["blended"] and res.settings["final_blend"]
    x_orig = sampling.invert(pixel_bb, _image(), 600, 10).last
    outside = (REGION == 0)[None, None].expand_as(x_orig)
    assert torch.equal(res.state[outside], x_orig[outside])
    no_blend = curve_matching(pixel_bb, _image(), REGION,
                              CurveMatchingConfig(**{**cfg.__dict__, "localized": False}))
    assert not no_blend.settings["final_blend"]
    assert not torch.equal(no_blend.state[outside], x_orig[outside])


def _edited_state(bb, t=600, steps=10):
    """An inverted X_t with its region replaced by noise, and the unedited path through it."""
    x_orig = sampling.invert(bb, _image(), t, steps).last
    noise = torch.randn(x_orig.shape, generator=torch.Generator().manual_seed(9))
    mask = REGION[None, None]
    return x_orig * (1 - mask) + noise * mask, x_orig, full_path(bb, x_orig, t, steps, None)


def test_blended_decode_oracles(pixel_bb):
    edited, x_orig, orig_path = _edited_state(pixel_bb)
    mask = REGION[None, None]
    cfg = CurveMatchingConfig(t=600, num_steps=10, t_blend=300)
    plain = sampling.generate(pixel_bb, x_orig, 600, 10).last
    # Nothing edited: pasting the unedited path back changes nothing.
    assert torch.allclose(blended_decode(pixel_bb, x_orig, orig_path, mask, cfg, 10, None),
                          plain,
                          atol=1e-5)
    # t_blend at or above t: no level to blend at, the paper's decode.
    high = CurveMatchingConfig(t=600, num_steps=10, t_blend=600)
    assert torch.equal(blended_decode(pixel_bb, edited, orig_path, mask, high, 10, None),
                       sampling.generate(pixel_bb, edited, 600, 10).last)
    # Blending down to level 100: the outside is the unedited path's level-100 state taken
    # through the last two steps, so it stays far closer to the unedited result.
    low = CurveMatchingConfig(t=600, num_steps=10, t_blend=0)
    out = blended_decode(pixel_bb, edited, orig_path, mask, low, 10, None)
    free = sampling.generate(pixel_bb, edited, 600, 10).last
    outside = (REGION == 0)[None, None].expand_as(out)
    err_blend = (out - plain)[outside].abs().max()
    err_free = (free - plain)[outside].abs().max()
    assert err_blend < 0.2 * err_free
    assert not torch.allclose(out[~outside], plain[~outside], atol=1e-3)  # the edit survives


def test_decode_blend_setting_is_used(pixel_bb):
    cfg = dict(t=600, num_steps=10, iterations=3, blend_every=3, t_blend=300,
               loss="minimize", lr=0.1)
    paper = curve_matching(pixel_bb, _image(), REGION,
                           CurveMatchingConfig(decode_blend=False, **cfg))
    ours = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(**cfg))  # default
    assert torch.equal(paper.state, ours.state)  # the optimisation is the same
    assert ours.settings["decode_blend"] and not paper.settings["decode_blend"]
    x_orig = sampling.invert(pixel_bb, _image(), 600, 10).last
    expected = blended_decode(pixel_bb, ours.state, full_path(pixel_bb, x_orig, 600, 10, None),
                              REGION[None, None], CurveMatchingConfig(**cfg), 10, None)
    assert torch.allclose(ours.image, pixel_bb.to_image(expected).clamp(-1, 1), atol=1e-6)
    assert torch.allclose(paper.image, pixel_bb.to_image(
        sampling.generate(pixel_bb, paper.state, 600, 10).last).clamp(-1, 1), atol=1e-6)
    # Without localized editing nothing is blended: the decode is the paper's too.
    free = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(
        **{**cfg, "localized": False}))
    assert not free.settings["decode_blend"]
    assert torch.allclose(free.image, pixel_bb.to_image(
        sampling.generate(pixel_bb, free.state, 600, 10).last).clamp(-1, 1), atol=1e-6)


def test_minimize_lowers_the_rate_and_history_is_complete(pixel_bb):
    cfg = CurveMatchingConfig(t=500, num_steps=10, iterations=12, refresh_every=6,
                              loss="minimize", lr=0.05, localized=False, snapshot_every=6)
    res = curve_matching(pixel_bb, _image(4), REGION, cfg)
    assert len(res.history) == 12 and len(res.snapshots) == 2
    assert res.region_curve_after.mean() < res.region_curve_before.mean()
    assert res.image.shape == (1, 3, 16, 16) and float(res.image.abs().max()) <= 1
    again = curve_matching(pixel_bb, _image(4), REGION, cfg)
    assert torch.equal(res.state, again.state)  # same seed, same run


def test_observers_see_every_iteration_and_can_stop_the_run(pixel_bb):
    cfg = CurveMatchingConfig(t=500, num_steps=10, iterations=5, loss="minimize",
                              localized=False, snapshot_every=2)
    seen: list = []
    with observe_iterations(lambda it, entry, snap: seen.append((it, entry["loss"], snap))):
        res = curve_matching(pixel_bb, _image(4), REGION, cfg)
    assert [it for it, _, _ in seen] == list(range(5))
    assert [loss for _, loss, _ in seen] == [h["loss"] for h in res.history]
    # the snapshot an iteration kept comes with it, and only then
    assert [snap is not None for _, _, snap in seen] == [False, True, False, True, False]
    assert torch.equal(seen[1][2], res.snapshots[0][1])
    outside = curve_matching(pixel_bb, _image(4), REGION, cfg)  # no observer once the block ends
    assert torch.equal(outside.state, res.state)

    class Stop(Exception):
        pass

    def stop_at_two(it, entry, snap):
        if it == 2:
            raise Stop

    with observe_iterations(stop_at_two), pytest.raises(Stop):
        curve_matching(pixel_bb, _image(4), REGION, cfg)


def test_match_and_saliency_losses_run(pixel_bb):
    m = curve_matching(pixel_bb, _image(), REGION,
                       CurveMatchingConfig(t=500, num_steps=10, iterations=3, loss="match"),
                       reference_pixel=(1, 1))
    assert m.reference_curve is not None and len(m.reference_curve) == 10
    s = curve_matching(pixel_bb, _image(), REGION,
                       CurveMatchingConfig(t=500, num_steps=10, iterations=3, loss="saliency",
                                           lambda2=-1.0))
    assert all(h["loss"] > 0 for h in s.history)


def test_paste_outside_keeps_the_edit_inside_and_the_original_outside():
    edited, original = torch.full((1, 3, 4, 4), 2.0), torch.full((1, 3, 4, 4), -1.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1.0
    mask[..., 0, 0] = 0.25  # a soft mask weighs the two states
    out = paste_outside(edited, original, mask)
    assert torch.equal(out[..., 1:3, 1:3], edited[..., 1:3, 1:3])
    assert torch.equal(out[..., 3, :], original[..., 3, :])
    assert torch.allclose(out[..., 0, 0], torch.tensor(0.25 * 2.0 - 0.75))


def test_match_outside_statistics_closed_form():
    gen = torch.Generator().manual_seed(0)
    x = 5 * torch.randn(1, 3, 16, 16, generator=gen) + 2
    ref = 0.4 * torch.randn(1, 3, 16, 16, generator=gen) - 0.1
    mask = REGION[None, None]
    out = match_outside_statistics(x, ref, mask)
    inside = REGION > 0.5
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])  # the outside is untouched
    for c in range(3):
        xi, ro = out[0, c][inside], ref[0, c][~inside]
        assert float(xi.mean()) == pytest.approx(float(ro.mean()), abs=1e-5)
        assert float(xi.std(unbiased=False)) == pytest.approx(float(ro.std(unbiased=False)),
                                                              rel=1e-5)
        # the spatial pattern inside is kept: an affine map of the input's region
        corr = torch.corrcoef(torch.stack([xi, x[0, c][inside]]))[0, 1]
        assert float(corr) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InputError, match="inside and outside"):
        match_outside_statistics(x, ref, torch.ones(1, 1, 16, 16))


def test_match_outside_stats_keeps_the_region_on_the_background_statistics(pixel_bb):
    cfg = dict(t=600, num_steps=10, iterations=4, loss="minimize", lr=0.5, localized=False)
    free = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(**cfg))
    kept = curve_matching(pixel_bb, _image(), REGION,
                          CurveMatchingConfig(match_outside_stats=True, **cfg))
    assert kept.settings["match_outside_stats"] and not free.settings["match_outside_stats"]
    x_orig = sampling.invert(pixel_bb, _image(), 600, 10).last
    inside = REGION > 0.5
    target_std = x_orig[:, :, ~inside].std(-1, unbiased=False)
    kept_std = kept.state[:, :, inside].std(-1, unbiased=False)
    free_std = free.state[:, :, inside].std(-1, unbiased=False)
    assert torch.allclose(kept_std, target_std, rtol=1e-4)
    assert torch.allclose(kept.state[:, :, inside].mean(-1), x_orig[:, :, ~inside].mean(-1),
                          atol=1e-5)
    assert not torch.allclose(free_std, target_std, rtol=1e-2)  # lr 0.5 moves it off
    with pytest.raises(InputError, match="inside and outside"):
        curve_matching(pixel_bb, _image(), torch.ones(16, 16),
                       CurveMatchingConfig(match_outside_stats=True, **cfg))


def test_full_path_passes_through_x_t(pixel_bb):
    x = sampling.invert(pixel_bb, _image(), 500, 10).last
    path = full_path(pixel_bb, x, 500, 10, None)
    assert sorted(path) == list(Grid.for_model(pixel_bb, 10)) and torch.equal(path[500], x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="match"), "reference pixel"),
    (dict(loss="nope"), "loss must be"),
    (dict(mode="quick"), "mode must be"),
    (dict(iterations=0), "iterations"),
    (dict(t=510, loss="minimize"), "not on the"),
    (dict(loss="saliency", lambda2=0.0), "lambda2"),
    (dict(loss="minimize", t_blend=-1), "t_blend"),
    (dict(loss="minimize", t_blend=500.0), "t_blend"),
    (dict(loss="minimize", pixels_per_iteration=0), "pixels_per_iteration"),
    (dict(loss="minimize", pixels_per_iteration=2.0), "pixels_per_iteration"),
    (dict(loss="minimize", refresh_drift=-0.1), "refresh_drift"),
    (dict(loss="minimize", refresh_drift=float("inf")), "refresh_drift"),
    (dict(loss="minimize", refresh_drift="0.1"), "refresh_drift"),
    (dict(loss="minimize", mode="faithful", refresh_drift=0.05), "fast mode only"),
    (dict(loss="minimize", pairs_per_jvp=0), "pairs_per_jvp"),
    (dict(loss="minimize", pairs_per_jvp=True), "pairs_per_jvp"),
    (dict(loss="minimize", walk_dtype="float64"), "walk_dtype"),
    (dict(loss="minimize", walk_dtype="half-ish"), "walk_dtype"),
])
def test_bad_settings(pixel_bb, kwargs, match):
    with pytest.raises(InputError, match=match):
        curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(num_steps=10, **kwargs))


def test_bad_regions(pixel_bb):
    with pytest.raises(InputError, match="empty"):
        curve_matching(pixel_bb, _image(), torch.zeros(16, 16),
                       CurveMatchingConfig(loss="minimize", num_steps=10))
    with pytest.raises(InputError, match="16x16"):
        curve_matching(pixel_bb, _image(), torch.ones(8, 8),
                       CurveMatchingConfig(loss="minimize", num_steps=10))


# ----------------------------------------------------------- latent (Stable Diffusion) models
def test_batched_rates_with_a_prompt_on_a_latent_model(sd_bb64):
    """The text context is repeated per batch element: batched rates equal single ones, and
    the gradient through a conditioned JVP matches central differences."""
    cond = sd_bb64.condition("a red cube")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, *sd_bb64.state_shape, generator=gen, dtype=torch.float64)
    deltas = 0.1 * torch.randn(3, *sd_bb64.state_shape, generator=gen, dtype=torch.float64)
    ts, cells = [101, 401, 801], [(2, 3), (7, 0), (2, 3)]
    v = torch.stack([pixel_direction(sd_bb64, p) for p in cells])
    batched = rates_batch(sd_bb64, x + deltas, ts, v, cond)
    for i in range(3):
        single = rates_batch(sd_bb64, x + deltas[i:i + 1], ts[i:i + 1], v[i:i + 1], cond)
        assert float(single[0]) == pytest.approx(float(batched[i]), rel=1e-10)
    unconditioned = rates_batch(sd_bb64, x + deltas, ts, v, sd_bb64.condition(""))
    assert not torch.allclose(unconditioned, batched)  # the prompt reaches every element
    z = x.clone().requires_grad_(True)
    rates_batch(sd_bb64, z + deltas[:1], ts[1:2], v[:1], cond)[0].backward()
    d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    s = 1e-5
    with torch.no_grad():
        fd = (rates_batch(sd_bb64, x + s * d + deltas[:1], ts[1:2], v[:1], cond)[0]
              - rates_batch(sd_bb64, x - s * d + deltas[:1], ts[1:2], v[:1], cond)[0]) / (2 * s)
    assert float((z.grad * d).sum()) == pytest.approx(float(fd), rel=1e-6)


def test_curve_matching_on_a_latent_model_keeps_the_outside_latents(sd_bb):
    """On a latent model the region lives on the latent grid (area-averaged, soft at cell
    edges): cells it does not touch keep the unedited X_t exactly, cells it covers are
    standardised to the outside's statistics, and the result decodes to an image."""
    t, steps = Grid.for_model(sd_bb, 10).timesteps[6], 10
    cond = sd_bb.condition("a red cube")
    cfg = CurveMatchingConfig(t=t, num_steps=steps, iterations=3, blend_every=2, t_blend=300,
                              loss="minimize", lr=0.2, pixels_per_iteration=2,
                              match_outside_stats=True)
    res = curve_matching(sd_bb, _image(), REGION, cfg, cond=cond)
    assert res.image.shape == (1, 3, 16, 16) and torch.isfinite(res.image).all()
    assert res.state.shape == (1, *sd_bb.state_shape)
    with torch.no_grad():
        x_orig = sampling.invert(sd_bb, sd_bb.to_state(_image()), t, steps, cond).last
    mask = sd_bb.state_region(REGION)[0, 0]
    assert 0 < float(mask.sum()) < mask.numel() and ((mask > 0) & (mask < 1)).any()
    untouched = (mask == 0)[None, None].expand_as(x_orig)
    assert torch.equal(res.state[untouched], x_orig[untouched])
    assert not torch.equal(res.state, x_orig)
    # the final step was a blend, so the covered cells hold the standardised values pasted
    # with weight mask; the fully covered ones (mask == 1) carry the outside's moments exactly
    # only before the paste, so check the standardisation on the optimiser's last iterate.
    stats = match_outside_statistics(res.state, x_orig, mask[None, None])
    inside = mask > 0.5
    assert torch.allclose(stats[:, :, inside].mean(-1), x_orig[:, :, ~inside].mean(-1),
                          atol=1e-5)


@pytest.mark.parametrize("task", ["transfer", "remove", "saliency", "blend"])
def test_every_task_runs_on_a_latent_model_with_a_prompt(sd_bb, task):
    cond = sd_bb.condition("a red cube")
    cfg = CurveMatchingConfig(t=Grid.for_model(sd_bb, 10).timesteps[6], num_steps=10, iterations=2,
                              refresh_every=1, pixels_per_iteration=2)
    args = {"transfer": ((13, 2),), "remove": (), "saliency": ("increase",), "blend": ()}[task]
    res = getattr(tasks, task)(sd_bb, _image(), REGION, *args, config=cfg, cond=cond)
    assert res.image.shape == (1, 3, 16, 16) and torch.isfinite(res.image).all()
    assert len(res.history) == 2 and all(len(h["samples"]) == 2 for h in res.history)
    # pixels are drawn in image coordinates from the region (the seam band when blending);
    # pixel_direction maps each to its latent cell
    region = tasks.boundary_band(REGION) if task == "blend" else REGION.numpy()
    assert all(region[s["pixel"][0], s["pixel"][1]] > 0.5
               for h in res.history for s in h["samples"])
    assert torch.isfinite(res.region_curve_after).all()


def test_task_presets_keep_their_iteration_budget_under_a_partial_config(monkeypatch):
    """A config that names no iteration count gets the task's (the paper's 70 for saliency,
    100 for blending, 300 otherwise); one that names it keeps it; 0 is refused, not 300."""
    seen = []
    monkeypatch.setattr(tasks, "curve_matching",
                        lambda bb, image, region, cfg, **kw: seen.append(cfg) or cfg)
    partial = CurveMatchingConfig(t=600, num_steps=10)
    tasks.saliency(None, _image(), REGION, "increase", config=partial)
    tasks.blend(None, _image(), REGION, config=partial)
    tasks.remove(None, _image(), REGION, config=partial)
    tasks.saliency(None, _image(), REGION, "decrease", config=CurveMatchingConfig(iterations=5))
    assert [c.budget for c in seen] == [70, 100, 300, 5]
    assert [c.lambda2 for c in seen] == [-1.0, 1.0, 1.0, 1.0] and seen[0].t == 600
    with pytest.raises(InputError, match="iterations must be an integer >= 1, got 0"):
        CurveMatchingConfig(iterations=0).validate()


def test_default_t_lands_on_the_models_grid(pixel_bb, sd_bb):
    """t=None is the grid point nearest the paper's 700: 700 on the pixel model's grid, 701 on
    the SD config's (steps_offset=1); an explicit t off the grid is still refused."""
    cfg = CurveMatchingConfig(num_steps=10, iterations=1, loss="minimize")
    assert cfg.on_grid(Grid.for_model(pixel_bb, 10)).t == 700
    res = curve_matching(sd_bb, _image(), REGION, cfg, cond=sd_bb.condition(""))
    assert res.settings["t"] == 701 and res.settings["grid"]["timesteps"][0] == 1
    with pytest.raises(InputError, match=r"t=700 is not on the 10-step leading grid \(offset 1"):
        curve_matching(sd_bb, _image(), REGION,
                       CurveMatchingConfig(t=700, num_steps=10, loss="minimize"))


# ------------------------------------------------------------------- cost settings and accounting
def test_path_cache_extended_in_pieces_is_the_single_walk(pixel_bb):
    """A lazily extended path holds exactly the states of one walk from X_t (DDIM steps are
    one-step maps), and counts one network call per level it walked."""
    grid = Grid.for_model(pixel_bb, 10)
    x = sampling.invert(pixel_bb, _image(), 500, grid).last
    whole = full_path(pixel_bb, x, 500, grid, None)
    cache = PathCache(pixel_bb, x, 500, grid, None)
    levels = list(grid)
    below, above = [lv for lv in levels if lv < 500], [lv for lv in levels if lv > 500]
    cache.extend([below[-2]])
    assert cache.steps == 2 and min(cache.states) == below[-2]
    cache.extend([below[0], above[1]])
    assert cache.steps == len(below) + 2
    cache.extend([above[0]])  # held already: no call
    assert cache.steps == len(below) + 2
    cache.complete()
    assert cache.steps == len(levels) - 1
    assert sorted(cache.states) == sorted(whole)
    assert all(torch.equal(cache.states[lv], whole[lv]) for lv in whole)


def test_cost_counts_every_walk_step(pixel_bb):
    """Faithful mode walks from X_t to the farthest sampled level on each side every iteration:
    the recorded steps are exactly those level counts; fast mode with a drift re-walk every
    iteration walks no more than the sampled levels need."""
    grid = Grid.for_model(pixel_bb, 10)
    levels = list(grid)
    cfg = dict(t=500, num_steps=10, iterations=4, loss="minimize", seed=5, localized=False,
               pixels_per_iteration=3, lr=0.1, refresh_every=50)
    res = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(mode="faithful", **cfg))

    def needed(tks):
        i = levels.index(500)
        return (i - min(levels.index(tk) for tk in tks + [500])
                + max(levels.index(tk) for tk in tks + [500]) - i)

    expected = [needed([s["t_k"] for s in h["samples"]]) for h in res.history]
    assert [h["walk_steps"] for h in res.history] == expected
    assert res.cost["walk_steps"] == sum(expected) and res.cost["rewalk_steps"] == 0
    assert res.cost["path_steps"] == len(levels) - 1
    phases = res.cost["phases"]
    assert {"setup", "walk", "derivative", "backward", "update", "decode"} <= set(phases)
    assert phases["derivative"]["entries"] == phases["backward"]["entries"] == 4
    assert all(p["seconds"] >= 0 for p in phases.values())
    drift = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(
        mode="fast", refresh_drift=1e-9, **cfg))
    rewalks = [h["walk_steps"] for h in drift.history]
    assert rewalks[0] == 0  # the original path is whole
    assert rewalks[1:] == [needed([s["t_k"] for s in h["samples"]])
                           for h in drift.history[1:]]
    assert drift.cost["rewalk_steps"] == sum(rewalks)
    assert "settings" not in drift.cost and "cost" not in drift.settings


def test_pairs_per_jvp_chunks_give_the_same_run(bb64):
    """Differentiating the pairs a chunk at a time sums the same gradient: same draws, same
    losses and state up to the rounding of the summation order (float64, so that Adam's
    normalised steps cannot amplify it into the compared digits). Without the feature term:
    at the first iteration X_tk is the original path's state, where |U(X_tk) − U(X^orig_tk)|
    sits on its kink and the rounding of a batch-size-dependent convolution picks the sign of
    its gradient."""
    cfg = dict(t=500, num_steps=10, iterations=3, loss="saliency", seed=2, lr=0.05,
               pixels_per_iteration=4, localized=False, feature_weight=0.0)
    img = _image(dtype=torch.float64)
    whole = curve_matching(bb64, img, REGION, CurveMatchingConfig(**cfg))
    chunked = curve_matching(bb64, img, REGION, CurveMatchingConfig(pairs_per_jvp=3, **cfg))
    assert chunked.cost["phases"]["derivative"]["entries"] == 6  # chunks of 3 and 1, 3 times
    assert [s["t_k"] for h in chunked.history for s in h["samples"]] == \
        [s["t_k"] for h in whole.history for s in h["samples"]]
    assert chunked.losses == pytest.approx(whole.losses, rel=1e-10)
    assert torch.allclose(chunked.state, whole.state, rtol=0, atol=1e-10)


def test_low_precision_walks_leave_the_derivative_in_float32(pixel_bb):
    """bfloat16 walks change ΔX by bfloat16 rounding only (8-bit mantissa: ~0.4% per
    operation); the state, the rates and the update stay float32."""
    cfg = dict(t=500, num_steps=10, iterations=3, loss="minimize", seed=1, localized=False,
               mode="faithful")
    ref = curve_matching(pixel_bb, _image(), REGION, CurveMatchingConfig(**cfg))
    low = curve_matching(pixel_bb, _image(), REGION,
                         CurveMatchingConfig(walk_dtype="bfloat16", **cfg))
    assert low.state.dtype == torch.float32
    assert [s["t_k"] for h in low.history for s in h["samples"]] == \
        [s["t_k"] for h in ref.history for s in h["samples"]]
    assert low.losses != ref.losses  # the walks did run in bfloat16
    assert low.losses == pytest.approx(ref.losses, rel=5e-2)
    x = ref.state
    with torch.no_grad():
        exact = walk_to(pixel_bb, x, 500, [100], 10, None)[100] - x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rough = walk_to(pixel_bb, x, 500, [100], 10, None)[100] - x
    assert rough.dtype == torch.float32
    assert float((rough - exact).norm() / exact.norm()) < 2e-2
