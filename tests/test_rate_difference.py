"""The central-difference rate (curve matching's ``derivative="difference"``) against the exact
forward-mode JVP: values and gradients, in float64 (the O(s²) law) and at the shipped step in
float32 on the default model; the config's defaults and refusals."""

from __future__ import annotations

import pytest
import torch

from diffgeo.backbones import load_backbone
from diffgeo.curves import pixel_direction
from diffgeo.editing.curve_matching import (
    CurveMatchingConfig,
    curve_matching,
    curve_of,
    full_path,
    rates_batch,
)
from diffgeo.errors import InputError
from diffgeo.jacobian import central_difference, jvp
from diffgeo.sampling import Grid


@pytest.fixture(scope="module")
def default_bb():
    return load_backbone("default")


def _state(bb, seed, dtype=torch.float32, batch=1):
    return torch.randn(batch, *bb.state_shape, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)


def _directions(bb, pixels):
    return torch.stack([pixel_direction(bb, p) for p in pixels])


def test_central_difference_converges_to_the_jvp_at_second_order(pixel_bb64):
    """Batched over states with different timesteps; the error falls ~100x per 10x step."""
    x = _state(pixel_bb64, 0, torch.float64, batch=2)
    v = _directions(pixel_bb64, [(3, 4), (9, 12)])
    t = torch.tensor([300, 800])
    _, exact = jvp(pixel_bb64, x, v, t, output="h")
    errors = [float((central_difference(pixel_bb64, x, v, t, output="h", step=s) - exact).norm()
                    / exact.norm()) for s in (1e-1, 1e-2)]
    assert errors[1] < 1e-4
    assert errors[0] / errors[1] == pytest.approx(100, rel=0.2)


def test_difference_rate_gradient_matches_the_exact_one_in_float64(pixel_bb64):
    """d/dX of ‖D h[e_p]‖ by a plain backward through the difference equals the exact
    reverse-over-forward gradient up to the step's O(s²)."""
    x = _state(pixel_bb64, 1, torch.float64, batch=2)
    v = _directions(pixel_bb64, [(6, 7), (2, 13)])
    grads = {}
    for derivative in ("exact", "difference"):
        z = x.clone().requires_grad_(True)
        rates_batch(pixel_bb64, z, [400, 600], v, None, derivative).sum().backward()
        grads[derivative] = z.grad
    rel = (grads["difference"] - grads["exact"]).norm() / grads["exact"].norm()
    assert float(rel) < 1e-4  # s = DIFFERENCE_STEP, truncation only in float64 (measured 2.6e-5)


@pytest.mark.parametrize("t", [101, 501, 901])
def test_shipped_step_in_float32_on_the_default_model(default_bb, t):
    """At DIFFERENCE_STEP the float32 rate is within 1e-3 and its gradient within 3e-3 of the
    exact ones (measured: 4e-6..2e-4 and 2e-4..7e-4, truncation and rounding together)."""
    H, W = default_bb.image_size
    x = _state(default_bb, t)
    v = _directions(default_bb, [(H // 3, W // 2)])
    out = {}
    for derivative in ("exact", "difference"):
        z = x.clone().requires_grad_(True)
        r = rates_batch(default_bb, z, [t], v, None, derivative)
        r.sum().backward()
        out[derivative] = (float(r[0].detach()), z.grad)
    (r_e, g_e), (r_d, g_d) = out["exact"], out["difference"]
    assert r_d == pytest.approx(r_e, rel=1e-3)
    assert float((g_d - g_e).norm() / g_e.norm()) < 3e-3


def test_difference_curve_equals_the_exact_curve(pixel_bb):
    """The batched curve (CURVE_CHUNK levels per call) over a whole path, float32."""
    x = _state(pixel_bb, 2)
    grid = Grid.for_model(pixel_bb, 20)
    path = full_path(pixel_bb, x, grid.nearest(500), grid, None)
    exact = curve_of(pixel_bb, path, (5, 8), None)
    diff = curve_of(pixel_bb, path, (5, 8), None, "difference")
    assert diff.shape == exact.shape == (len(path),)
    assert torch.allclose(diff, exact, rtol=1e-3, atol=1e-6)


def test_each_mode_takes_its_default_derivative_and_records_it():
    fast, faithful = CurveMatchingConfig(mode="fast"), CurveMatchingConfig(mode="faithful")
    assert fast.derivative_for(torch.float32) == "difference"
    assert fast.derivative_for(torch.float64) == "difference"
    assert fast.derivative_for(torch.bfloat16) == "exact"  # rounding would swamp the rate
    assert faithful.derivative_for(torch.float32) == "exact"
    assert CurveMatchingConfig(mode="faithful", derivative="difference").derivative_for(
        torch.float32) == "difference"


def test_fast_mode_with_either_derivative_follows_the_same_losses(pixel_bb):
    """The approximation changes the run by far less than the fast/faithful gate's 10%."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    region = torch.zeros(16, 16)
    region[4:9, 5:11] = 1
    cfg = dict(t=500, num_steps=10, iterations=6, refresh_every=3, loss="minimize", seed=1,
               localized=False, pixels_per_iteration=2)
    runs = {d: curve_matching(pixel_bb, image, region, CurveMatchingConfig(derivative=d, **cfg))
            for d in ("exact", None)}
    assert runs[None].settings["derivative"] == "difference"
    assert runs["exact"].settings["derivative"] == "exact"
    assert runs[None].losses == pytest.approx(runs["exact"].losses, rel=1e-2)
    # every curve of a run takes the run's derivative: the one-time curves too
    before = {d: r.region_curve_before for d, r in runs.items()}
    assert not torch.equal(before[None], before["exact"])
    assert torch.allclose(before[None], before["exact"], rtol=1e-3, atol=1e-6)
    assert torch.allclose(runs[None].region_curve_after, runs["exact"].region_curve_after,
                          rtol=1e-2, atol=1e-5)


def test_bad_derivatives_are_refused_before_any_work(pixel_bb):
    with pytest.raises(InputError, match="derivative must be one of"):
        CurveMatchingConfig(derivative="jvp").validate()
    with pytest.raises(InputError, match="float32 or float64"):
        CurveMatchingConfig(derivative="difference").derivative_for(torch.float16)
    with pytest.raises(InputError, match="step must be a finite number > 0"):
        x = _state(pixel_bb, 0)
        central_difference(pixel_bb, x, x, 100, output="h", step=0.0)
