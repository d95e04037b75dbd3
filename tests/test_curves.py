"""Generation curves: closed forms on the linear-Gaussian model, hand-computed fluctuation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgeo import sampling
from diffgeo.backbones import linear_gaussian
from diffgeo.curves import (
    fluctuation,
    generation_curves,
    pixel_direction,
    salient_and_background_pixels,
    state_cell,
)
from diffgeo.errors import InputError
from diffgeo.train import ddpm_scheduler


@pytest.fixture(scope="module")
def gaussian():
    g = torch.Generator().manual_seed(0)
    d = 3 * 4 * 4
    U = torch.randn(d, 5, generator=g, dtype=torch.float64)
    cov = U @ U.T / 5 + 1e-3 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    ac = ddpm_scheduler().alphas_cumprod.double()
    return linear_gaussian(mean, cov, ac, state_shape=(3, 4, 4))


def test_h_curve_equals_closed_form(gaussian):
    bb = gaussian
    x0 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inv = sampling.invert(bb, x0, t=700, grid=20)
    V = torch.stack([pixel_direction(bb, (1, 2)), pixel_direction(bb, (3, 0), channel=2)])
    curves = generation_curves(bb, inv, V, chunk=1)
    lam, Q = bb.gaussian["eigenvalues"], bb.gaussian["eigenvectors"]
    for j, t in enumerate(curves.timesteps):
        ab = bb.alphas_cumprod[t]
        gain = (1 - ab).sqrt() / (ab * lam + 1 - ab)
        for k in range(2):
            expected = (gain * (Q.T @ V[k].reshape(-1))).norm()
            assert curves.values[k, j].item() == pytest.approx(expected.item(), rel=1e-5)
    assert curves.timesteps == sorted(curves.timesteps)
    assert curves.timesteps[-1] == 700


def test_curves_keep_the_backbones_dtype(gaussian):
    """A float64 backbone gives float64 curves (they used to be cast to float32, which capped
    closed-form checks at ~1e-7 relative); a float32 backbone still gives float32."""
    bb = gaussian
    x0 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inv = sampling.invert(bb, x0, 700, 20)
    V = torch.stack([pixel_direction(bb, (1, 2)), pixel_direction(bb, (3, 0), channel=2)])
    curves = generation_curves(bb, inv, V)
    assert curves.values.dtype == torch.float64
    lam, Q = bb.gaussian["eigenvalues"], bb.gaussian["eigenvectors"]
    ab = bb.alphas_cumprod[torch.tensor(curves.timesteps)][:, None]
    gain = (1 - ab).sqrt() / (ab * lam + 1 - ab)  # (N, d)
    expected = (gain[None] * (V.reshape(2, -1) @ Q)[:, None]).norm(dim=-1)  # (2, N)
    assert torch.allclose(curves.values, expected, rtol=1e-12, atol=0)
    assert curves.fluctuation(t_min=200).dtype == torch.float64
    # A projected definition: the basis of the whole 48-dimensional space (k + oversample is
    # clamped to it, and exact), so 'h-proj' equals 'h' to round-off.
    proj = generation_curves(bb, inv, V, "h-proj", k=48)
    assert proj.values.dtype == torch.float64
    assert torch.allclose(proj.values, expected, rtol=1e-12, atol=0)
    bb32 = linear_gaussian(bb.gaussian["mean"], bb.gaussian["cov"], bb.alphas_cumprod,
                           state_shape=(3, 4, 4), dtype=torch.float32)
    c32 = generation_curves(bb32, sampling.invert(bb32, x0.float(), 700, 20), V.float())
    assert c32.values.dtype == torch.float32
    assert torch.allclose(c32.values.double(), expected, rtol=1e-5)


def test_fluctuation_matches_hand_computation():
    ts = list(range(0, 1000, 100))  # 10 points, 7 above t=200 (300..900)
    vals = torch.tensor([[5.0, 9.0, 1.0, 2.0, 4.0, 2.0, 4.0, 2.0, 4.0, 2.0]])
    f = fluctuation(vals, ts, window=5, t_min=200)
    kept = np.array([2.0, 4.0, 2.0, 4.0, 2.0, 4.0, 2.0])
    expected = np.mean([kept[i:i + 5].var() for i in range(3)])
    assert f.item() == pytest.approx(expected)
    # a flat curve does not fluctuate, whatever its level
    assert fluctuation(torch.full((10,), 3.0), ts).item() == 0.0
    with pytest.raises(InputError, match="window"):
        fluctuation(vals, ts, window=9, t_min=200)


def test_salient_and_background_pixels():
    mask = np.zeros((16, 16), np.float32)
    mask[4:10, 5:11] = 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        (orow, ocol), (brow, bcol) = salient_and_background_pixels(mask, rng, margin=3)
        assert 5 <= orow <= 8 and 6 <= ocol <= 9  # interior after one erosion
        dist = np.sqrt(((np.argwhere(mask > 0.5) - [brow, bcol]) ** 2).sum(1)).min()
        assert dist >= 3
    with pytest.raises(InputError, match="object and background"):
        salient_and_background_pixels(np.zeros((8, 8)), rng)


def test_pixel_cells_and_errors(gaussian):
    assert state_cell(gaussian, (3, 1)) == (3, 1)
    v = pixel_direction(gaussian, (0, 0))
    assert v.norm().item() == pytest.approx(1.0)
    with pytest.raises(InputError, match="outside"):
        pixel_direction(gaussian, (4, 0))
    with pytest.raises(InputError, match="channel"):
        pixel_direction(gaussian, (0, 0), channel=3)
    with pytest.raises(InputError, match="definition"):
        x0 = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
        generation_curves(gaussian, sampling.invert(gaussian, x0, 100, 10), v, definition="nope")
