"""Whole-image rate maps against the per-pixel JVP loop, and closed forms on a linear Gaussian."""

from __future__ import annotations

import pytest
import torch

from diffgeo import sampling
from diffgeo.backbones import linear_gaussian, load_backbone
from diffgeo.curves import (
    generation_curves,
    pixel_component,
    previous_level,
    rates_at,
    row_component,
)
from diffgeo.errors import InputError
from diffgeo.maps import rate_map, rate_maps_along, saliency_map
from diffgeo.tangent import principal_angles, tangent_basis
from diffgeo.train import build_unet, ddpm_scheduler, export_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-maps")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        export_model(build_unet("tiny-16"), path)
    bb = load_backbone(path)
    x0 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inv = sampling.invert(bb, x0, 500, 20)
    return bb, inv


@pytest.fixture(scope="module")
def gaussian():
    # Distinct eigenvalues 0.1 .. 10: at t ~ 100 the gains sqrt(1-ab)/(ab·λ + 1-ab) of Dh differ
    # by several percent between neighbours, so every singular subspace is unique and well
    # separated, and the tangent basis has one right answer to compare with.
    g = torch.Generator().manual_seed(0)
    d = 2 * 4 * 4
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.logspace(-1, 1, d, dtype=torch.float64)
    cov = Q @ torch.diag(lam) @ Q.T
    cov = (cov + cov.T) / 2
    return linear_gaussian(torch.zeros(d, dtype=torch.float64), cov,
                           ddpm_scheduler().alphas_cumprod.double(), state_shape=(2, 4, 4))


@pytest.mark.parametrize("definition", ["exact", "eps", "h-proj"])
def test_gram_map_equals_per_pixel_loop(tiny, definition):
    bb, inv = tiny
    x = inv.at(500)
    basis = tangent_basis(bb, x, 500, k=4)
    t_prev = previous_level(bb, inv, 500)
    fast = rate_map(bb, x, 500, definition, "gram", basis, t_prev)
    loop = rate_map(bb, x, 500, definition, "loop", basis, t_prev)
    # Same float32 quantities summed in another order (k×k Gram vs n-dim norms): ~1e-6.
    assert torch.allclose(fast.values, loop.values, rtol=1e-4, atol=1e-6 * loop.values.max())
    assert fast.relative_std == 0.0 and fast.estimator == "gram"


def test_probe_map_within_its_statistical_bound(tiny):
    bb, inv = tiny
    x = inv.at(500)
    loop = rate_map(bb, x, 500, "h", "loop")
    K = 128
    probe = rate_map(bb, x, 500, "h", "probe", probes=K,
                     generator=torch.Generator().manual_seed(1))
    rel = probe.values / loop.values - 1
    assert probe.relative_std == pytest.approx((1 / (2 * K)) ** 0.5)
    # 256 cells, each a sqrt(χ²_K/K) deviate: the empirical std matches the stated one within
    # sampling error (a 25% band), the mean bias is O(1/K), and no cell is off by 5 sigma.
    assert rel.std().item() == pytest.approx(probe.relative_std, rel=0.25)
    assert abs(rel.mean().item()) < 3 * probe.relative_std / 16 + 1 / K
    assert rel.abs().max().item() < 5 * probe.relative_std
    # the same generator seed gives the same map
    again = rate_map(bb, x, 500, "h", "probe", probes=K, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.values, probe.values)


def test_lowrank_is_exact_at_full_rank_and_a_lower_bound_below(gaussian):
    bb = gaussian
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loop = rate_map(bb, x, 300, "h", "loop")
    full = tangent_basis(bb, x, 300, k=32, tol=1e-12, max_iter=500)
    exact = rate_map(bb, x, 300, "h", "lowrank", full)
    assert torch.allclose(exact.values, loop.values, rtol=1e-5)
    low = rate_map(bb, x, 300, "h", "lowrank", tangent_basis(bb, x, 300, k=3, tol=1e-10,
                                                             max_iter=500))
    assert bool((low.values <= loop.values * (1 + 1e-6)).all())


def test_maps_keep_the_backbones_float64_and_a_full_basis_is_exact(gaussian):
    """A float64 backbone gives float64 maps (they used to be cast to float32, capping
    closed-form checks at ~1e-7). k = 32 is the whole state space: the basis is exact without
    a pass (the default oversample of 4 used to be refused here), so the gram map of 'eps' is
    ‖Dε v‖ and the low-rank map of 'h' is ‖Dh v‖, both in closed form."""
    from diffgeo.maps import cell_directions, upsample_to_image

    bb = gaussian
    lam, Q = bb.gaussian["eigenvalues"], bb.gaussian["eigenvectors"]
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = 300
    full = tangent_basis(bb, x, t, k=32, oversample=4)
    assert full.exact and full.iterations == 0
    ab = bb.alphas_cumprod[t]
    inv_c = 1 / (ab * lam + 1 - ab)
    cells = cell_directions(bb).reshape(16, 32).T  # (n, cells)
    D_eps = (1 - ab).sqrt() * Q @ torch.diag(inv_c) @ Q.T
    D_h = torch.diag((1 - ab).sqrt() * inv_c) @ Q.T
    eps_map = rate_map(bb, x, t, "eps", "gram", full)
    h_map = rate_map(bb, x, t, "h", "lowrank", full)
    loop = rate_map(bb, x, t, "h", "loop")
    for m, J in ((eps_map, D_eps), (h_map, D_h), (loop, D_h)):
        assert m.values.dtype == torch.float64
        expected = (J @ cells).norm(dim=0).reshape(4, 4)
        assert torch.allclose(m.values, expected, rtol=1e-12, atol=0), m.estimator
    assert upsample_to_image(eps_map.values, (8, 8)).dtype == torch.float64
    inv = sampling.invert(bb, x, 900, 10)
    maps = rate_maps_along(bb, inv, "eps", k=32)
    assert maps.values.dtype == torch.float64 and maps.saliency(t_min=0).dtype == torch.float64


def test_exact_rate_equals_closed_form_on_linear_gaussian(gaussian):
    """r_t(v) = ‖(A·I + B·Dε) Proj v‖ with Dε = sqrt(1-ab)·C_t⁻¹ and Proj onto the top-k right
    singular vectors of Dh = diag(gain)·Qᵀ, all known in closed form."""
    bb = gaussian
    lam, Q = bb.gaussian["eigenvalues"], bb.gaussian["eigenvectors"]
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t, t_prev, k = 100, 80, 3
    basis = tangent_basis(bb, x, t, k=k, tol=1e-12, max_iter=1000)
    ab, abp = bb.alphas_cumprod[t], bb.alphas_cumprod[t_prev]
    gain = (1 - ab).sqrt() / (ab * lam + 1 - ab)
    top = torch.argsort(gain, descending=True)[:k]
    P = Q[:, top] @ Q[:, top].T
    A = (abp / ab).sqrt()
    B = (1 - abp).sqrt() - (abp * (1 - ab) / ab).sqrt()
    D_eps = (1 - ab).sqrt() * Q @ torch.diag(1 / (ab * lam + 1 - ab)) @ Q.T
    dirs = torch.eye(32, dtype=torch.float64).reshape(32, 2, 4, 4)[:6]
    ours = rates_at(bb, x, t, dirs, "exact", basis, t_prev)
    expected = ((A * torch.eye(32, dtype=torch.float64) + B * D_eps) @ P @ dirs.reshape(6, 32).T
                ).norm(dim=0)
    # The power iteration converges at the rate σ4/σ3 ≈ 0.92 per step; it stops with the
    # subspace within a principal angle θ of the truth (measured 5e-6), and the rates then
    # differ by O(θ) relative.
    theta = principal_angles(basis.flat(), Q[:, top]).max().item()
    assert theta < 1e-4
    assert torch.allclose(ours, expected, rtol=10 * theta)


def test_patch_rate_is_mean_of_pixel_rates_and_curves_are_deterministic(tiny):
    bb, inv = tiny
    row = row_component(bb, 3)
    pixels = [pixel_component(bb, p) for p in row.pixels]
    a = generation_curves(bb, inv, [row] + pixels, "h", t_min=300)
    assert torch.allclose(a.values[0], a.values[1:].mean(0), rtol=1e-5)
    b = generation_curves(bb, inv, [row], "h", t_min=300)
    assert torch.equal(a.values[0], b.values[0])
    p = generation_curves(bb, inv, pixels[:2], "exact", k=3, t_min=400)
    q = generation_curves(bb, inv, pixels[:2], "exact", k=3, t_min=400)
    assert torch.equal(p.values, q.values) and p.timesteps == [400, 450, 500]  # 50-step grid


def test_maps_along_path_and_saliency_map(tiny):
    bb, inv = tiny
    maps = rate_maps_along(bb, inv, "h", "probe", probes=16, seed=0)
    assert maps.values.shape == (len(inv.noisy_timesteps()), 16, 16)
    sal = saliency_map(maps, window=5, t_min=200)
    assert sal.shape == (16, 16) and bool((sal >= 0).all())
    # the saliency map is the fluctuation of every cell's curve
    from diffgeo.curves import fluctuation

    cell = maps.values[:, 5, 7]
    assert sal[5, 7].item() == pytest.approx(fluctuation(cell, maps.timesteps).item(), rel=1e-6)


def test_map_input_errors(tiny):
    bb, inv = tiny
    x = inv.at(500)
    with pytest.raises(InputError, match="estimator"):
        rate_map(bb, x, 500, "h", "gram")
    with pytest.raises(InputError, match="estimator must be one of"):
        rate_map(bb, x, 500, "h", "bogus")
    with pytest.raises(InputError, match="batch 1"):
        rate_map(bb, torch.cat([x, x]), 500, "h")
    with pytest.raises(InputError, match="probes"):
        rate_map(bb, x, 500, "h", "probe", probes=0)
