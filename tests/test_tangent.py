"""Tangent bases (block power iteration on D h) against closed-form and explicit-SVD oracles.

Oracles: (1) a tiny pixel U-Net whose Jacobian of h is formed explicitly (one JVP per state
dimension) and decomposed with a dense SVD; (2) the linear-Gaussian backbone, whose h is linear
with Jacobian diag(gain)·Qᵀ, so singular values and vectors are known in closed form. Everything
runs in float64, so tolerances reflect the algorithm and its stopping rule, not round-off.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffgeo import ddim
from diffgeo.backbones import linear_gaussian, load_backbone
from diffgeo.ddim import Trajectory
from diffgeo.errors import InputError
from diffgeo.jacobian import batched_jvp
from diffgeo.tangent import (
    TangentBasis,
    principal_angles,
    tangent_bases_along,
    tangent_basis,
)

T_PIXEL = 500


# ---------------------------------------------------------------------------------- fixtures
def _export_tiny(folder: Path, resolution: int | None) -> Path:
    from diffgeo.train import build_unet, export_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = build_unet("tiny-16", resolution=resolution)
    return export_model(unet, folder)


@pytest.fixture(scope="module")
def unet16(tmp_path_factory):
    """The tiny-16 pixel U-Net (state 3x16x16 = 768 dims) in float64."""
    path = _export_tiny(tmp_path_factory.mktemp("tangent") / "tiny16", None)
    return load_backbone(path, dtype="float64")


@pytest.fixture(scope="module")
def unet8(tmp_path_factory):
    """The same architecture at 8x8 (192 dims): for tests that need many bases."""
    path = _export_tiny(tmp_path_factory.mktemp("tangent") / "tiny8", 8)
    return load_backbone(path, dtype="float64")


@pytest.fixture(scope="module")
def explicit(unet16):
    """x, and the dense SVD of J = ∂h/∂x at (x, t=500): 768 JVPs (~4 s on one thread)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, *unet16.state_shape, generator=g, dtype=torch.float64)
    n = x.numel()
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *unet16.state_shape)
    J = batched_jvp(unet16, x, eye, T_PIXEL, output="h", chunk=64).reshape(n, -1).T
    _, S, Vh = torch.linalg.svd(J, full_matrices=False)
    return x, S, Vh


@pytest.fixture(scope="module")
def pixel_runs(unet16, explicit):
    """Converged bases without and with oversampling (tol 1e-6: the default 1e-4 stops at a
    subspace error of ~0.1 rad on this untrained net, whose leading singular values are only
    ~4% apart)."""
    x = explicit[0]
    return {p: tangent_basis(unet16, x, T_PIXEL, k=3, oversample=p, tol=1e-6, max_iter=200)
            for p in (0, 5)}


def _ac() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _gaussian(eigenvalues: torch.Tensor, seed: int = 0):
    """linear_gaussian with covariance Q diag(eigenvalues) Qᵀ for a random rotation Q."""
    d = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    cov = Q @ torch.diag(eigenvalues) @ Q.T
    mean = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    return linear_gaussian(mean, (cov + cov.T) / 2, _ac())


def _gain(bb, t: int) -> torch.Tensor:
    ab = bb.alphas_cumprod[t]
    return (1 - ab).sqrt() / (ab * bb.gaussian["eigenvalues"] + 1 - ab)


@pytest.fixture(scope="module")
def gauss():
    """d = 48: a rank-6 'signal' part plus small, *distinct* eigenvalues. J = diag(gain)·Qᵀ with
    gain_j ∝ 1/(ab·λ_j + 1 - ab): the leading singular vectors are the smallest-variance
    eigenvectors, and small λ spaced well apart (relative to (1 - ab)/ab ≈ 0.1 at t = 100) make
    them unique and the iteration fast."""
    lam = torch.cat([torch.tensor([4.0, 3.0, 2.5, 2.0, 1.5, 1.0], dtype=torch.float64),
                     torch.tensor([0.0, 0.05, 0.12, 0.22, 0.35], dtype=torch.float64),
                     torch.linspace(0.5, 0.9, 37, dtype=torch.float64)])
    return _gaussian(lam)


def _assert_basis_invariants(b: TangentBasis, atol: float = 1e-10) -> None:
    V = b.flat()
    assert torch.allclose(V.T @ V, torch.eye(b.k, dtype=V.dtype), atol=atol)
    s = b.singular_values
    assert bool((s[:-1] >= s[1:]).all()), "singular values must be descending"
    for v in b.vectors.reshape(b.k, -1):
        assert v[v.abs().argmax()] > 0, "sign convention: largest |component| is positive"


def _gauss_x(bb, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, *bb.state_shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------- pixel U-Net
@pytest.mark.parametrize("oversample", [0, 5])
def test_pixel_unet_matches_explicit_svd(pixel_runs, explicit, oversample):
    _, S, Vh = explicit
    b = pixel_runs[oversample]
    assert b.converged and b.iterations < 200
    assert b.timestep == T_PIXEL and b.vectors.shape == (3, 3, 16, 16)
    _assert_basis_invariants(b)
    rel = (b.singular_values / S[:3] - 1).abs()
    assert float(rel.max()) < 1e-2
    cos = (b.flat().T @ Vh[:3].T).diagonal().abs()
    assert float(cos.min()) >= 0.99
    assert float(principal_angles(b, Vh[:3].T).max()) < 0.05
    # Ritz values never exceed the true singular values (interlacing).
    assert bool((b.singular_values <= S[:3] * (1 + 1e-12)).all())


def test_oversampling_needs_fewer_passes_and_keeps_an_orthonormal_block(pixel_runs, explicit):
    plain, over = pixel_runs[0], pixel_runs[5]
    assert over.iterations < plain.iterations
    assert plain.extra_vectors is None and over.extra_vectors.shape == (5, 3, 16, 16)
    block = torch.cat([over.vectors, over.extra_vectors]).reshape(8, -1)
    assert torch.allclose(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert float(over.extra_values.max()) <= float(over.singular_values[-1])
    # The test quantities recorded per pass are the ones the stopping rule used.
    assert len(over.residuals) == len(over.angles) == over.iterations
    assert over.residuals[-1] <= 1e-6 and over.angles[-1] <= 1e-3


# ---------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("output", ["h", "eps"])
def test_linear_gaussian_closed_form(gauss, output):
    """J_h = diag(gain)·Qᵀ and J_ε = Q·diag(gain)·Qᵀ: same singular values and right vectors."""
    t, k = 100, 4
    b = tangent_basis(gauss, _gauss_x(gauss), t, k=k, output=output, tol=1e-12, max_iter=300)
    gain = _gain(gauss, t)
    order = torch.argsort(gain, descending=True)[:k]
    assert b.converged
    _assert_basis_invariants(b)
    assert torch.allclose(b.singular_values, gain[order], rtol=1e-9)
    Q = gauss.gaussian["eigenvectors"][:, order]
    cos = (b.flat().T @ Q).diagonal().abs()
    assert float((1 - cos).max()) < 1e-9
    assert float(principal_angles(b, Q).max()) < 1e-5


def test_linear_gaussian_low_rank_plus_isotropic_spans_the_complement():
    """Σ = U·diag(big)·Uᵀ + σ²·I: the top singular value is degenerate (all directions ⟂ U share
    it), so only the values and the span (⟂ U) are determined, not the vectors."""
    d, r, sigma2 = 48, 8, 0.01
    lam = torch.cat([torch.linspace(1.0, 4.0, r, dtype=torch.float64),
                     torch.zeros(d - r, dtype=torch.float64)]) + sigma2
    bb = _gaussian(lam, seed=5)
    b = tangent_basis(bb, _gauss_x(bb), 100, k=3, tol=1e-10)
    ab = bb.alphas_cumprod[100]
    expected = (1 - ab).sqrt() / (ab * sigma2 + 1 - ab)
    assert b.converged
    _assert_basis_invariants(b)
    assert torch.allclose(b.singular_values, expected.expand(3), rtol=1e-10)
    U = bb.gaussian["eigenvectors"][:, torch.argsort(bb.gaussian["eigenvalues"])[-r:]]
    # The stopping rule (successive angle <= sqrt(tol) = 1e-5, contraction ~0.01 per pass here)
    # bounds the distance to the exact span far below this.
    assert float((U.T @ b.flat()).abs().max()) < 1e-6


def test_rayleigh_ritz_alone_recovers_an_exact_subspace(gauss):
    """power_passes=0 with init spanning the top eigenvectors (in a scrambled basis): the
    Rayleigh–Ritz step alone returns the exact, ordered, signed singular vectors."""
    t, k = 100, 3
    gain = _gain(gauss, t)
    Q = gauss.gaussian["eigenvectors"][:, torch.argsort(gain, descending=True)[:k]]
    g = torch.Generator().manual_seed(7)
    scrambled = Q @ torch.randn(k, k, generator=g, dtype=torch.float64)
    b = tangent_basis(gauss, _gauss_x(gauss), t, k=k, power_passes=0, init=scrambled.T)
    assert b.iterations == 0 and not b.converged and b.settings["vjps"] == 0
    assert b.settings["random_columns"] == 0
    _assert_basis_invariants(b)
    assert torch.allclose(b.flat().abs(), Q.abs(), atol=1e-10)
    assert torch.allclose(b.singular_values, gain.sort(descending=True).values[:k], rtol=1e-10)


# ---------------------------------------------------------------------------------- warm start
def test_warm_start_is_exact_when_the_tangent_space_does_not_move(gauss):
    """The Gaussian's singular vectors are the same at every t: a warm start is already
    converged, and one pass (the least that can compare two iterates) confirms it."""
    x0 = gauss.gaussian["mean"][None].clone()
    traj = ddim.invert(gauss, x0, T_PIXEL, 10)
    bases = tangent_bases_along(gauss, traj, k=3, tol=1e-10, max_iter=300)
    assert list(bases) == traj.grid()
    first, *rest = bases.values()
    assert first.iterations > 1 and not first.settings["warm_started"]
    assert all(b.iterations == 1 and b.converged and b.settings["warm_started"] for b in rest)
    for t, b in bases.items():
        gain = _gain(gauss, t)
        top = torch.argsort(gain, descending=True)[:3]
        assert torch.allclose(b.singular_values, gain[top], rtol=1e-9)
        # The first basis stops at a successive angle <= sqrt(tol) = 1e-5; warm passes refine it.
        assert float(principal_angles(b, gauss.gaussian["eigenvectors"][:, top]).max()) < 1e-5


def test_warm_start_along_a_unet_trajectory(unet8):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, *unet8.state_shape, generator=g, dtype=torch.float64) * 2 - 1
    traj = ddim.invert(unet8, x0, T_PIXEL, 10)
    kw = dict(k=3, oversample=3, tol=1e-5)
    cold = tangent_bases_along(unet8, traj, warm_start=False, **kw)
    warm = tangent_bases_along(unet8, traj, warm_start=True, **kw)
    assert list(cold) == list(warm) == [0, 100, 200, 300, 400, 500]
    assert all(b.converged for b in [*cold.values(), *warm.values()])
    n_cold = sum(b.iterations for b in cold.values())
    n_warm = sum(b.iterations for b in warm.values())
    assert n_warm < n_cold, (n_warm, n_cold)
    for t in cold:
        assert float(principal_angles(cold[t], warm[t]).max()) < 0.02, t
        assert torch.allclose(cold[t].singular_values, warm[t].singular_values, rtol=1e-3)


def test_cheap_mode_costs_and_first_timestep(gauss):
    """power_passes=q: exactly q passes, (q+1)·m JVPs and q·m VJPs; along a trajectory the
    first (cold) timestep still iterates to convergence unless converge_first=False."""
    x0 = gauss.gaussian["mean"][None].clone()
    traj = ddim.invert(gauss, x0, 300, 10)
    bases = tangent_bases_along(gauss, traj, k=2, oversample=2, power_passes=1, tol=1e-10)
    first, *rest = bases.values()
    assert first.converged and first.settings["power_passes"] is None
    for b in rest:
        assert b.iterations == 1 and b.settings["jvps"] == 8 and b.settings["vjps"] == 4
    raw = tangent_bases_along(gauss, traj, k=2, oversample=2, power_passes=1,
                              converge_first=False)
    assert next(iter(raw.values())).iterations == 1


# ---------------------------------------------------------------------------------- determinism
def test_same_seed_same_basis(unet8):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, *unet8.state_shape, generator=g, dtype=torch.float64)
    run = lambda gen: tangent_basis(unet8, x, 300, k=3, oversample=2, power_passes=3,  # noqa: E731
                                    generator=gen)
    a, b = run(torch.Generator().manual_seed(4)), run(torch.Generator().manual_seed(4))
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.singular_values, b.singular_values)
    c, d = run(None), run(None)  # the documented default: a fresh generator seeded 0
    assert torch.equal(c.vectors, d.vectors) and c.settings["seed"] == 0
    assert torch.equal(c.vectors, run(torch.Generator().manual_seed(0)).vectors)


def test_float32_backbone():
    lam = 0.2 * torch.arange(16, dtype=torch.float64)  # ascending: Q[:, :2] is the answer
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q
    bb = linear_gaussian(torch.zeros(16), Q @ torch.diag(lam) @ Q.T, _ac(), dtype=torch.float32)
    x = torch.randn(1, 16, generator=g).float()
    b = tangent_basis(bb, x, 100, k=2, tol=1e-5, max_iter=200)
    assert b.vectors.dtype == torch.float32 and b.converged
    assert float(principal_angles(b, Q[:, :2]).max()) < 1e-2  # sqrt(tol) ≈ 3e-3 per pass


# ---------------------------------------------------------------------------------- projection
def test_project_is_an_orthogonal_projection(gauss):
    b = tangent_basis(gauss, _gauss_x(gauss), 100, k=3, tol=1e-8)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 5, 48, generator=g, dtype=torch.float64)
    Pu, Pv = b.project(u), b.project(v)
    assert Pu.shape == u.shape and b.project(u[0]).shape == (48,)
    assert torch.allclose(b.project(Pu), Pu, atol=1e-12)                    # idempotent
    assert torch.allclose((Pu * v).sum(1), (u * Pv).sum(1), atol=1e-12)     # symmetric
    assert torch.allclose(b.project(u[0]), Pu[0])
    c = b.coordinates(u)
    assert c.shape == (5, 3) and b.coordinates(u[0]).shape == (3,)
    assert torch.allclose(c @ b.flat().T, Pu, atol=1e-12)
    assert torch.allclose(b.project(b.vectors), b.vectors, atol=1e-12)
    assert b.project(u.float()).dtype == torch.float32
    assert b.flat().shape == (48, 3)


def test_principal_angles_known_values():
    theta = 0.3
    e = torch.eye(5, dtype=torch.float64)
    A = torch.stack([e[0], e[1]], 1)
    B = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]], 1)
    ang = principal_angles(A, B)
    assert torch.allclose(ang, torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-12)
    tiny = 1e-9  # arccos of the cosine would read this as 0; the sine keeps it
    C = torch.stack([e[0], math.cos(tiny) * e[1] + math.sin(tiny) * e[2]], 1)
    assert abs(float(principal_angles(A, C)[-1]) - tiny) < 1e-15
    # (k, *state) stacks, unnormalised inputs, and a larger second space.
    assert torch.allclose(principal_angles((3 * A.T).reshape(2, 5, 1), B.T), ang, atol=1e-12)
    assert principal_angles(A, e[:, :4]).shape == (2,)
    assert float(principal_angles(A, e[:, 2:4]).min()) == pytest.approx(math.pi / 2)
    with pytest.raises(InputError, match="same space"):
        principal_angles(A, torch.eye(6, dtype=torch.float64)[:, :2])


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be >= 1"),
    (dict(k=True), "k must be an integer"),
    (dict(k=49), "k must be <= the state dimension 48"),
    (dict(k=40, oversample=9), "k \\+ oversample"),
    (dict(oversample=-1), "oversample"),
    (dict(output="x0"), "output must be one of"),
    (dict(tol=0.0), "tol must be"),
    (dict(max_iter=0), "max_iter"),
    (dict(power_passes=-1), "power_passes"),
    (dict(chunk=0), "chunk"),
    (dict(t=100.0), "integer timestep"),
    (dict(t=1000), "t must lie in"),
    (dict(init=torch.zeros(2, 47)), "init must be"),
    (dict(init=[1, 2]), "init must be"),
    (dict(generator=0), "generator must be"),
])
def test_bad_inputs(gauss, kwargs, match):
    args = dict(t=100)
    args.update(kwargs)
    t = args.pop("t")
    with pytest.raises(InputError, match=match):
        tangent_basis(gauss, _gauss_x(gauss), t, **args)


def test_bad_states_and_trajectories(gauss, unet8):
    x = _gauss_x(gauss)
    with pytest.raises(InputError, match="batch 1"):
        tangent_basis(gauss, x.repeat(2, 1), 100)
    with pytest.raises(InputError, match="x is torch.float32"):
        tangent_basis(gauss, x.float(), 100)
    with pytest.raises(InputError, match="x must have shape"):
        tangent_basis(gauss, x[:, :40], 100)
    with pytest.raises(InputError, match="NaN"):
        tangent_basis(gauss, torch.full_like(x, float("nan")), 100)
    b = tangent_basis(gauss, x, 100, k=2, power_passes=1)
    with pytest.raises(InputError, match="init is a basis for states of shape"):
        tangent_basis(unet8, torch.zeros(1, *unet8.state_shape, dtype=torch.float64), 100,
                      init=b)
    with pytest.raises(InputError, match="v must have shape"):
        b.project(torch.zeros(3, 47, dtype=torch.float64))
    with pytest.raises(InputError, match="trajectory must be"):
        tangent_bases_along(gauss, [x])
    two = Trajectory([None, 0], [x.repeat(2, 1)] * 2, "inversion")
    with pytest.raises(InputError, match="batch 1"):
        tangent_bases_along(gauss, two)
    with pytest.raises(InputError, match="no noisy timesteps"):
        tangent_bases_along(gauss, Trajectory([None], [x], "inversion"))


def test_init_is_truncated_or_filled(gauss):
    x = _gauss_x(gauss)
    g = torch.Generator().manual_seed(0)
    many = torch.randn(10, 48, generator=g, dtype=torch.float64)
    b = tangent_basis(gauss, x, 100, k=2, oversample=1, power_passes=1, init=many)
    assert b.settings["warm_start_columns"] == 3 and b.settings["random_columns"] == 0
    b = tangent_basis(gauss, x, 100, k=3, oversample=1, power_passes=1, init=many[0])
    assert b.settings["warm_start_columns"] == 1 and b.settings["random_columns"] == 3
