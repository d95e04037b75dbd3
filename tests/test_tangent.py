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

from diffgeo import sampling
from diffgeo.backbones import FunctionalBackbone, linear_gaussian, load_backbone
from diffgeo.errors import InputError
from diffgeo.jacobian import batched_jvp
from diffgeo.sampling import Trajectory
from diffgeo.tangent import (
    PowerIterationConfig,
    TangentBasis,
    block_power_iteration,
    power_config,
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
    """Converged bases without and with oversampling (tol 1e-6: this untrained net's leading
    singular values are only ~4% apart, so the subspace error is the residual over a small gap)."""
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
    # One residual check per pass count 0..iterations; the last one is what the stop used.
    assert len(over.residuals) == len(over.error_bounds) == over.iterations + 1
    assert over.residuals[-1] <= 1e-6 and over.converged
    # Davis–Kahan: the bound covers the true angle. Without oversampling no Ritz pair outside
    # the block measures the gap, so there is no bound.
    assert float(principal_angles(over, explicit[2][:3].T).max()) <= over.error_bound < 1e-3
    assert plain.error_bound is None and plain.settings["error_bound"] is None


def test_small_gap_convergence_means_what_it_says(unet16, explicit):
    """k = 4 here has σ₅/σ₄ ≈ 0.99. The former test on successive changes (Ritz values by
    ≤ tol, subspace by ≤ sqrt(tol) per pass) declared convergence at the default tol 0.04 rad
    from the exact subspace with oversample 4, and 0.12 rad for k = 3 without oversampling.
    "Converged" now means residuals ≤ tol·σ², and the reported bound covers the true angle."""
    x, S, Vh = explicit
    over = tangent_basis(unet16, x, T_PIXEL, k=4, oversample=4)
    angle = float(principal_angles(over, Vh[:4].T).max())
    assert over.converged and angle <= over.error_bound < 1e-2
    assert over.settings["error_bound"] == over.error_bound
    # The residual guarantee: each σ̃² lies within tol·σ̃² of an exact σ².
    th = over.singular_values**2
    assert float(((th[:, None] - S[None] ** 2).abs().min(1).values / th).max()) <= 1e-4
    plain = tangent_basis(unet16, x, T_PIXEL, k=3, oversample=0)
    assert not plain.converged or float(principal_angles(plain, Vh[:3].T).max()) < 1e-2


def test_block_larger_than_the_output_is_clamped_and_exact():
    """h = A x with a 12-dimensional h on a 48-dimensional state: J = A has rank 12. k = 12 with
    oversample 4 used to crash in a reshape (16 Ritz vectors from a 12-row J V); the block is
    now clamped to 12, one pass spans J's row space, and the answer is exact and says so.
    k = 13 is refused: J has no 13th nonzero singular value."""
    g = torch.Generator().manual_seed(4)
    A = torch.randn(12, 48, generator=g, dtype=torch.float64)

    def h_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ A.T

    bb = FunctionalBackbone(lambda x, t: x, _ac(), (48,), h_fn=h_fn, dtype=torch.float64)
    x = torch.randn(1, 48, generator=g, dtype=torch.float64)
    _, S, Vh = torch.linalg.svd(A, full_matrices=False)
    for k, oversample in ((12, 4), (5, 8)):
        b = tangent_basis(bb, x, 100, k=k, oversample=oversample)
        assert b.exact and b.converged and b.iterations == 1
        assert b.settings["block_size"] == 12 and b.settings["exact"]
        _assert_basis_invariants(b)
        assert torch.allclose(b.singular_values, S[:k], rtol=1e-12)
        assert float(principal_angles(b, Vh[:k].T).max()) < 1e-10
        assert b.error_bound is not None and b.error_bound < 1e-10
    with pytest.raises(InputError, match="k must be <= 12: J maps the 48-dimensional state"):
        tangent_basis(bb, x, 100, k=13, oversample=0)


@pytest.mark.parametrize("k, oversample", [(48, 0), (48, 3), (40, 9)])
def test_block_as_large_as_the_space_is_exact_without_a_pass(gauss, k, oversample):
    """k + oversample >= the state dimension 48: the block is the whole space, Rayleigh–Ritz on
    it is exact, no pass is run; k = 49 is refused (test_bad_inputs)."""
    t = 100
    b = tangent_basis(gauss, _gauss_x(gauss), t, k=k, oversample=oversample)
    assert b.exact and b.converged and b.iterations == 0
    assert b.settings["block_size"] == 48 and b.settings["jvps"] == 48
    _assert_basis_invariants(b)
    gain = _gain(gauss, t).sort(descending=True).values
    assert torch.allclose(b.singular_values, gain[:k], rtol=1e-12)
    assert b.error_bound is not None and b.error_bound < 1e-10
    assert (b.extra_vectors is None) == (k == 48)


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
    # Residuals <= tol = 1e-10 make every returned vector an eigenvector of JᵀJ to that
    # accuracy, and the eigenspace of the top value is ⟂ U, with a gap of ~0.01 relative.
    assert float((U.T @ b.flat()).abs().max()) < 1e-6
    # Which 3 of the degenerate directions is not determined, and the bound says so.
    assert b.error_bound == pytest.approx(math.pi / 2)


def test_rayleigh_ritz_alone_recovers_an_exact_subspace(gauss):
    """power_passes=0 with init spanning the top eigenvectors (in a scrambled basis): the
    Rayleigh–Ritz step alone returns the exact, ordered, signed singular vectors."""
    t, k = 100, 3
    gain = _gain(gauss, t)
    Q = gauss.gaussian["eigenvectors"][:, torch.argsort(gain, descending=True)[:k]]
    g = torch.Generator().manual_seed(7)
    scrambled = Q @ torch.randn(k, k, generator=g, dtype=torch.float64)
    b = tangent_basis(gauss, _gauss_x(gauss), t, k=k, oversample=0, power_passes=0,
                      init=scrambled.T)
    # No pass, but the residual check (Jᵀ on the k Ritz outputs: k VJPs) confirms the pairs.
    assert b.iterations == 0 and b.converged and b.settings["vjps"] == k
    assert b.settings["random_columns"] == 0 and not b.exact
    _assert_basis_invariants(b)
    assert torch.allclose(b.flat().abs(), Q.abs(), atol=1e-10)
    assert torch.allclose(b.singular_values, gain.sort(descending=True).values[:k], rtol=1e-10)


# ---------------------------------------------------------------------------------- warm start
def test_warm_start_is_exact_when_the_tangent_space_does_not_move(gauss):
    """The Gaussian's singular vectors are the same at every t: a warm start is already
    converged, and the residual check on the start block confirms it without a pass."""
    x0 = gauss.gaussian["mean"][None].clone()
    traj = sampling.invert(gauss, x0, T_PIXEL, 10)
    bases = tangent_bases_along(gauss, traj, k=3, tol=1e-10, max_iter=300)
    assert list(bases) == traj.noisy_timesteps()
    first, *rest = bases.values()
    assert first.iterations > 1 and not first.settings["warm_started"]
    assert all(b.converged and b.settings["warm_started"] for b in rest)
    # At t = 0 σ₁ = 100 and the round-off allowance (relative to σ₁²) lets the third pair stop
    # at a relative residual ~5e-9; where the spectrum is flat, the next basis refines that in a
    # few passes, and from then on the start block passes the test as it is.
    assert rest[0].iterations <= 5 and all(b.iterations == 0 for b in rest[1:])
    for t, b in bases.items():
        gain = _gain(gauss, t)
        top = torch.argsort(gain, descending=True)[:3]
        assert torch.allclose(b.singular_values, gain[top], rtol=1e-9)
        # Residuals <= tol = 1e-10 over gaps of several percent, and the bound covers it.
        angle = float(principal_angles(b, gauss.gaussian["eigenvectors"][:, top]).max())
        assert angle < 1e-5 and angle <= b.error_bound


def test_warm_start_along_a_unet_trajectory(unet8):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, *unet8.state_shape, generator=g, dtype=torch.float64) * 2 - 1
    traj = sampling.invert(unet8, x0, T_PIXEL, 10)
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
    """power_passes=q: exactly q passes, (q+1)·m JVPs and q·m VJPs plus the final residual
    check's min(m, k+1); along a trajectory the first (cold) timestep still iterates to
    convergence unless converge_first=False."""
    x0 = gauss.gaussian["mean"][None].clone()
    traj = sampling.invert(gauss, x0, 300, 10)
    bases = tangent_bases_along(gauss, traj, k=2, oversample=2, power_passes=1, tol=1e-10)
    first, *rest = bases.values()
    assert first.converged and first.settings["power_passes"] is None
    for b in rest:
        assert b.iterations == 1 and b.settings["jvps"] == 8 and b.settings["vjps"] == 4 + 3
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
    # Residuals <= 1e-5 relative over gaps of tens of percent; round-off is ~1e-7.
    assert float(principal_angles(b, Q[:, :2]).max()) < 1e-2


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
    (dict(oversample=-1), "oversample"),
    (dict(output="x0"), "output must be one of"),
    (dict(tol=0.0), "tol must be"),
    (dict(tol=float("nan")), "tol must be a finite number"),
    (dict(max_iter=0), "max_iter"),
    (dict(power_passes=-1), "power_passes"),
    (dict(config=dict(k=3)), "config must be a PowerIterationConfig"),
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
    grid = sampling.invert(gauss, x, 100, 10).grid
    two = Trajectory([None, 0], [x.repeat(2, 1)] * 2, "inversion", grid)
    with pytest.raises(InputError, match="batch 1"):
        tangent_bases_along(gauss, two)
    with pytest.raises(InputError, match="no noisy timesteps"):
        tangent_bases_along(gauss, Trajectory([None], [x], "inversion", grid))


def test_init_is_truncated_or_filled(gauss):
    x = _gauss_x(gauss)
    g = torch.Generator().manual_seed(0)
    many = torch.randn(10, 48, generator=g, dtype=torch.float64)
    b = tangent_basis(gauss, x, 100, k=2, oversample=1, power_passes=1, init=many)
    assert b.settings["warm_start_columns"] == 3 and b.settings["random_columns"] == 0
    b = tangent_basis(gauss, x, 100, k=3, oversample=1, power_passes=1, init=many[0])
    assert b.settings["warm_start_columns"] == 1 and b.settings["random_columns"] == 3


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be >= 1, got 0"),
    (dict(k=True), "k must be an integer >= 1, got True"),
    (dict(k=2.0), "k must be an integer >= 1, got 2.0"),
    (dict(oversample=-1), "oversample must be >= 0"),
    (dict(oversample=False), "oversample must be an integer"),
    (dict(max_iter=0), "max_iter must be >= 1"),
    (dict(max_iter="5"), "max_iter must be an integer"),
    (dict(power_passes=-1), "power_passes must be >= 0"),
    (dict(power_passes=1.5), "power_passes must be an integer"),
    (dict(tol=0), "tol must be a finite number > 0, got 0"),
    (dict(tol=-1e-3), "tol must be a finite number > 0"),
    (dict(tol=float("inf")), "tol must be a finite number > 0, got inf"),
    (dict(tol=True), "tol must be a finite number > 0, got True"),
    (dict(tol="1e-4"), "tol must be a finite number > 0"),
])
def test_config_is_validated_once_with_clear_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        PowerIterationConfig(**kwargs)
    # The keyword shorthand goes through the same validation.
    with pytest.raises(InputError, match=match):
        power_config(None, **kwargs)


def test_config_normalises_is_frozen_and_combines_with_keywords(gauss):
    import dataclasses

    import numpy as np

    cfg = PowerIterationConfig(k=np.int64(2), tol=1, max_iter=np.int32(40))
    assert (cfg.k, cfg.tol, cfg.max_iter) == (2, 1.0, 40)
    assert type(cfg.k) is int and type(cfg.tol) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3  # type: ignore[misc]
    assert PowerIterationConfig() == PowerIterationConfig(k=3, oversample=1, max_iter=50,
                                                          tol=1e-4, power_passes=None)
    # A keyword replaces its field; None leaves the config's value.
    both = power_config(cfg, oversample=3, tol=None)
    assert (both.k, both.oversample, both.tol) == (2, 3, 1.0)
    with pytest.raises(InputError, match="unknown power-iteration option"):
        power_config(cfg, kk=3)
    # One config or the same options as keywords: the same run.
    x = _gauss_x(gauss)
    a = tangent_basis(gauss, x, 100, config=PowerIterationConfig(k=2, oversample=2, tol=1e-8))
    b = tangent_basis(gauss, x, 100, k=2, oversample=2, tol=1e-8)
    c = tangent_basis(gauss, x, 100, k=2, tol=1e-8, config=PowerIterationConfig(oversample=2))
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.vectors, c.vectors)
    assert a.settings == b.settings and a.settings["oversample"] == 2
    along = tangent_bases_along(gauss, sampling.invert(gauss, x, 300, 10),
                                config=PowerIterationConfig(k=2, power_passes=1, tol=1e-8))
    first, *rest = along.values()
    assert first.settings["power_passes"] is None and rest[0].settings["power_passes"] == 1
    # The generic loop takes the config in place of k.
    n = 6
    M = torch.diag(torch.arange(n, 0, -1, dtype=torch.float64))
    r = block_power_iteration(lambda V: V @ M.T, lambda W: W @ M, (n,),
                              PowerIterationConfig(k=2, tol=1e-10), dtype=torch.float64)
    assert torch.allclose(r.singular_values, torch.tensor([6.0, 5.0], dtype=torch.float64))
    assert r.config.k == 2 and r.converged and r.error_bound < 1e-8
