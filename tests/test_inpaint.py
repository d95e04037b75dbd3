"""Inpainting baselines for object removal: mean-colour fill and RePaint on the DDIM grid."""

from __future__ import annotations

import pytest
import torch

from diffgeo.backbones.functional import linear_gaussian
from diffgeo.editing import mean_fill, repaint
from diffgeo.errors import InputError


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


MASK = torch.zeros(16, 16)
MASK[5:10, 4:12] = 1


def _image(seed=0):
    return torch.rand(1, 3, 16, 16, generator=_gen(seed)) * 2 - 1


def test_mean_fill_paints_the_outside_mean():
    x = _image()
    out = mean_fill(x, MASK)
    keep = MASK == 0
    assert torch.equal(out[..., keep], x[..., keep])
    for c in range(3):
        expected = x[0, c][keep].mean()
        assert torch.allclose(out[0, c][MASK == 1], expected.expand(int(MASK.sum())), atol=1e-6)


@pytest.mark.parametrize("bad, fragment", [
    (torch.zeros(16, 16), "empty"), (torch.ones(16, 16), "whole image"),
    (torch.ones(8, 8), "16x16"),
])
def test_mask_errors_are_specific(bad, fragment):
    with pytest.raises(InputError, match=fragment):
        mean_fill(_image(), bad)


def test_repaint_keeps_outside_exactly_and_is_seeded(pixel_bb):
    x = _image()
    a = repaint(pixel_bb, x, MASK, grid=10, generator=_gen(3))
    b = repaint(pixel_bb, x, MASK, grid=10, generator=_gen(3))
    c = repaint(pixel_bb, x, MASK, grid=10, generator=_gen(4))
    keep = MASK == 0
    assert torch.equal(a[..., keep], x[..., keep])
    assert torch.equal(a, b)
    assert not torch.allclose(a[..., MASK == 1], c[..., MASK == 1])
    assert not torch.allclose(a[..., MASK == 1], x[..., MASK == 1])
    assert a.abs().max() <= 1


def test_repaint_validates_its_arguments(pixel_bb):
    with pytest.raises(InputError, match="generator"):
        repaint(pixel_bb, _image(), MASK)
    with pytest.raises(InputError, match="resample"):
        repaint(pixel_bb, _image(), MASK, resample=0, generator=_gen(0))
    with pytest.raises(InputError, match=r"\(1, C, H, W\)"):
        repaint(pixel_bb, _image()[0], MASK, generator=_gen(0))


@pytest.mark.parametrize("resample", [1, 3])
def test_repaint_fills_a_correlated_gaussian_with_its_conditional_mean(resample):
    """With the exact denoiser of a Gaussian whose pixels move together, the repainted hole must
    land near the closed-form conditional mean E[x_hole | x_known], not near what was there."""
    side, d = 4, 16
    cov = 0.3 * torch.ones(d, d, dtype=torch.float64) + 0.002 * torch.eye(d, dtype=torch.float64)
    bb = linear_gaussian(torch.zeros(d), cov, _alphas_cumprod(), state_shape=(1, side, side))
    hole = torch.zeros(side, side)
    hole[1:3, 1:3] = 1
    known_value = 0.5
    x = torch.full((1, 1, side, side), known_value, dtype=torch.float64)
    x[..., hole == 1] = -0.9
    h, k = (hole.flatten() == 1), (hole.flatten() == 0)
    cond_mean = cov[h][:, k] @ torch.linalg.solve(cov[k][:, k],
                                                  x.flatten()[k])  # E[x_h | x_k], mean 0
    outs = torch.stack([repaint(bb, x, hole, grid=50, resample=resample, clip_x0=False,
                                generator=_gen(s)).flatten()[h] for s in range(8)])
    assert torch.allclose(cond_mean, torch.full_like(cond_mean, cond_mean[0]))
    err = (outs.mean(0) - cond_mean).abs().max()
    assert err < 0.05, (outs.mean(0), cond_mean)
