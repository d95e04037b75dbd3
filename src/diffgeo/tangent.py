"""Tangent spaces of the time-varying data manifold: leading right singular vectors of D h_t.

Following Park et al. (2023), adopted by the generation-curves paper (§2.2), the tangent space of
the noisy data manifold M_t at a state X_t is approximated by the span of the k leading right
singular vectors of J = D h_t(X_t), the differential of the U-Net encoder ("bottleneck") map with
respect to the state. J is never formed: it is an (|h| x n) matrix with n up to 16k (SD latents),
and each column would cost one JVP. Instead a *block power (subspace) iteration* on JᵀJ uses only
products with blocks of m = k + p vectors:

    W = J V          (m JVPs, one batched network call per ``chunk`` directions)
    Z = Jᵀ W         (m VJPs)
    V ← QR(Z)        (re-orthonormalised every pass: no reliance on round-off for deflation)

and a Rayleigh–Ritz step (SVD of the small |h| x m matrix J V) turns the subspace into ordered
singular vectors and values. This is the randomized range finder of Halko, Martinsson & Tropp
(2011) when the number of passes is fixed (``power_passes``), with ``oversample`` = p extra
vectors that make a couple of passes enough; with ``power_passes=None`` it iterates until the
Ritz values and the Ritz subspace stop moving (see :func:`tangent_basis` for the exact test).

Along a DDIM trajectory the tangent space moves slowly, so :func:`tangent_bases_along` warm-starts
each timestep from the previous one: one or two passes then recover what a cold start needs tens of
passes for (measured in ``benchmarks/tangent_accuracy.py``).

Conventions: a basis stores its vectors with the state's shape, ``vectors[i]`` of shape
``state_shape``; flattened they are orthonormal. Singular values are descending, and every vector
is signed so that its component of largest absolute value is positive, so that bases are
deterministic and comparable across runs and timesteps (convergence tests do not trip on sign
flips). Vectors of a repeated singular value are only defined up to a rotation within their
eigenspace; compare such bases with :func:`principal_angles`, not vector by vector.

A caveat worth knowing: for the closed-form linear-Gaussian oracle, h = Qᵀε, so D h is a rotation
of D ε, which is *largest* along low-variance (normal) directions of the data. The leading singular
vectors there span the normal space, not the tangent space; the "tangent" reading relies on a
trained U-Net's encoder compressing normal directions (Kvinge et al., 2024), an empirical property
this module does not (and cannot) check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.ddim import Trajectory
from diffgeo.errors import InputError
from diffgeo.jacobian import OUTPUTS, batched_jvp, batched_vjp

__all__ = ["DEFAULT_SEED", "PowerIterationResult", "TangentBasis", "block_power_iteration",
           "principal_angles", "tangent_basis", "tangent_bases_along"]

DEFAULT_SEED = 0  # seed of the generator used when none is given: same call, same basis


@dataclass
class TangentBasis:
    """k leading right singular vectors of D output(X_t) at one state, with how they were found.

    ``vectors``: (k, *state_shape), orthonormal when flattened. ``singular_values``: (k,),
    descending (float64: they are Ritz values of the small matrix J V). ``residuals[i]``: the
    largest relative change of the k Ritz values at pass i+1; ``angles[i]``: the largest principal
    angle (radians) between the Ritz subspaces of passes i and i+1 — the two quantities of the
    convergence test. ``extra_vectors`` / ``extra_values``: the oversampling Ritz pairs (k+1..k+p),
    kept so that a warm start can reuse the whole block. ``converged`` is True only when the
    convergence test passed at the last pass (always False for ``power_passes`` runs that were
    not tested or did not meet it).
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    timestep: int
    iterations: int
    converged: bool
    residuals: list[float] = field(default_factory=list)
    angles: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    extra_vectors: torch.Tensor | None = None
    extra_values: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.vectors.shape[1:])

    def flat(self) -> torch.Tensor:
        """The basis as an (n, k) matrix with orthonormal columns."""
        return self.vectors.reshape(self.k, -1).T

    def _flatten(self, v: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        shape = self.state_shape
        if tuple(v.shape) == shape:
            return v.reshape(1, -1), False
        if v.ndim == len(shape) + 1 and tuple(v.shape[1:]) == shape:
            return v.reshape(v.shape[0], -1), True
        raise InputError(f"{name} must have shape {shape} or (K, {', '.join(map(str, shape))}), "
                         f"got {tuple(v.shape)}")

    def coordinates(self, v: torch.Tensor) -> torch.Tensor:
        """Vᵀv: (K, k) for v of shape (K, *state), (k,) for a single v of shape state_shape."""
        flat, batched = self._flatten(v, "v")
        c = flat.to(self.vectors) @ self.flat()
        c = c.to(v.device, v.dtype if v.is_floating_point() else c.dtype)
        return c if batched else c[0]

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """V Vᵀ v, the orthogonal projection onto the basis span (Proj of the paper's Eq. 6).

        Same shape and dtype as ``v``: (*state) or (K, *state).
        """
        flat, _ = self._flatten(v, "v")
        V = self.flat()
        p = (flat.to(V) @ V) @ V.T
        return p.reshape(v.shape).to(v.device, v.dtype if v.is_floating_point() else V.dtype)


# ---------------------------------------------------------------------------------- helpers


def _as_matrix(a: torch.Tensor | TangentBasis, name: str) -> torch.Tensor:
    """(n, k) matrix from a TangentBasis, a (k, *state) stack (ndim > 2) or a 2-D matrix.

    A 2-D tensor is read as (n, k) when it has at least as many rows as columns, else as (k, n):
    a basis never has more vectors than dimensions, so only a square input is ambiguous (and then
    both readings span the same space when it has full rank).
    """
    if isinstance(a, TangentBasis):
        return a.flat()
    if not isinstance(a, torch.Tensor):
        raise InputError(f"{name} must be a TangentBasis or a tensor, got {type(a).__name__}")
    if a.ndim < 2:
        raise InputError(f"{name} must be (k, *state_shape) or (n, k), got {tuple(a.shape)}")
    if a.ndim > 2:
        return a.reshape(a.shape[0], -1).T
    return a if a.shape[0] >= a.shape[1] else a.T


def principal_angles(A: torch.Tensor | TangentBasis, B: torch.Tensor | TangentBasis
                     ) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B), float64.

    A and B are TangentBasis objects, (k, *state_shape) stacks or (n, k) matrices (see
    ``_as_matrix`` for how a 2-D tensor is read); they need not be orthonormal. min(kA, kB) angles
    are returned. Small angles come from sines and large ones from cosines (Knyazev & Argentati,
    2002), because arccos of a cosine near 1 loses half the digits: an angle of 1e-8 would read as
    ~1e-8 only through the sine.
    """
    a = _as_matrix(A, "A").to(torch.float64)
    b = _as_matrix(B, "B").to(a.device, torch.float64)
    if a.shape[0] != b.shape[0]:
        raise InputError(f"A and B must live in the same space: A has dimension {a.shape[0]}, "
                         f"B has {b.shape[0]}")
    if a.shape[1] < b.shape[1]:
        a, b = b, a
    qa = torch.linalg.qr(a).Q
    qb = torch.linalg.qr(b).Q
    m = qa.T @ qb
    # i-th smallest angle <-> i-th largest cosine <-> i-th smallest sine.
    from_cos = torch.arccos(torch.linalg.svdvals(m).clamp(0, 1))
    from_sin = torch.arcsin(torch.linalg.svdvals(qb - qa @ m).clamp(0, 1).flip(0))
    return torch.where(from_sin < math.pi / 4, from_sin, from_cos).sort().values


def _orthonormal(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(M).Q


def _sign_fix(P: torch.Tensor) -> torch.Tensor:
    """Flip columns so that each one's component of largest absolute value is positive."""
    idx = P.abs().argmax(dim=0)
    s = torch.sign(P.gather(0, idx[None])[0])
    s = torch.where(s == 0, torch.ones_like(s), s)
    return P * s


def _rayleigh_ritz(V: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz vectors (n, m) and values (m,) of J on span(V), given W = J V.

    The SVD of the small matrix W = U S Pᵀ gives J (V P) = U S: the columns of V P are the best
    approximations to J's right singular vectors within span(V), with values S (descending).
    Computed in float64 whatever the model's dtype: the matrices are small.
    """
    _, s, ph = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    return V.to(torch.float64) @ ph.T, s


def _sv_change(old: torch.Tensor, new: torch.Tensor) -> float:
    """max_i |Δσ_i| / σ_i, with σ_i floored at sqrt(eps)·σ_1 so that values lost in round-off
    (a rank-deficient J) cannot block convergence."""
    floor = max(float(new[0]), float(old[0])) * torch.finfo(torch.float64).eps ** 0.5
    if floor == 0.0:
        return 0.0
    return float(((new - old).abs() / new.clamp_min(floor)).max())


def _largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between spans of two orthonormal (n, k) matrices, via the sine
    (accurate for the small angles a convergence test compares to sqrt(tol))."""
    m = a.T @ b
    sin = torch.linalg.svdvals(b - a @ m)
    s = float(sin.max().clamp(0, 1)) if sin.numel() else 0.0
    if s < math.sqrt(0.5):
        return math.asin(s)
    cos = torch.linalg.svdvals(m)
    return math.acos(float(cos.min().clamp(0, 1)))


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise InputError(f"{name} must be >= {low}, got {value}")
    return value


def _init_columns(init: torch.Tensor | None, shape: tuple[int, ...], m: int,
                  what: str = "a tensor") -> tuple[torch.Tensor | None, int]:
    """The warm-start columns as an (n, k') float64 matrix (at most m of them), or None."""
    if init is None:
        return None, 0
    if not isinstance(init, torch.Tensor):
        raise InputError(f"init must be {what} or None, got {type(init).__name__}")
    if init.ndim == len(shape):
        init = init[None]
    if tuple(init.shape[1:]) != shape or init.shape[0] < 1:
        raise InputError(f"init must be {what} of shape "
                         f"(k', {', '.join(map(str, shape))}), got {tuple(init.shape)}")
    vecs = init[:m].detach().to(torch.float64)
    if not torch.isfinite(vecs).all():
        raise InputError("init contains NaN or infinite values")
    return vecs.reshape(vecs.shape[0], -1).T, int(vecs.shape[0])


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a fresh one seeded with DEFAULT_SEED: same call, same draws."""
    if generator is None:
        return torch.Generator().manual_seed(DEFAULT_SEED)
    if not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator or None, "
                         f"got {type(generator).__name__}")
    return generator


# ---------------------------------------------------------------------------------- generic core


@dataclass
class PowerIterationResult:
    """What :func:`block_power_iteration` found: k leading right singular pairs of an operator J.

    ``vectors`` (k, *shape), orthonormal when flattened, signed by the module's convention;
    ``singular_values`` (k,) float64, descending; ``extra_vectors`` / ``extra_values``: the
    oversampling Ritz pairs (None without oversampling); ``residuals`` / ``angles``: the two
    convergence-test quantities per pass; ``jvps`` / ``vjps``: how many products J·v and Jᵀ·w
    were applied (the cost); ``warm_start_columns`` / ``random_columns``: how the start block was
    made, ``seed`` the generator's initial seed when random columns were drawn.
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    iterations: int
    converged: bool
    residuals: list[float]
    angles: list[float]
    extra_vectors: torch.Tensor | None
    extra_values: torch.Tensor | None
    jvps: int
    vjps: int
    warm_start_columns: int
    random_columns: int
    seed: int | None


def block_power_iteration(
    apply_j: Callable[[torch.Tensor], torch.Tensor],
    apply_jt: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    k: int,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    oversample: int = 0,
    power_passes: int | None = None,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    space: str = "input",
) -> PowerIterationResult:
    """k leading right singular vectors of a linear operator J known only through products.

    ``apply_j`` maps a batch of m input vectors (m, *shape) to J·V (m, *out_shape); ``apply_jt``
    maps a batch (m, *out_shape) back to Jᵀ·W (m, *shape). Both receive tensors in ``dtype`` on
    ``device``, contiguous. This is the loop :func:`tangent_basis` runs on D h(x) and RBE runs on
    the masked decoder Jacobian ∂(M ⊙ ε)/∂h: block power (subspace) iteration on JᵀJ with
    m = k + ``oversample`` vectors, QR every pass (deflation never relies on round-off), a
    Rayleigh–Ritz step in float64 after every pass, the sign convention of this module, and the
    two-part convergence test (relative change of the k Ritz values ≤ ``tol`` and largest
    principal angle between successive k-dimensional Ritz subspaces ≤ sqrt(``tol``)), or exactly
    ``power_passes`` passes without a test (see :func:`tangent_basis` for the trade-offs).

    ``init``: (k', *shape) start vectors (truncated to m; missing columns are Gaussian draws from
    ``generator``, default a fresh generator seeded 0). ``space`` names the input space in error
    messages ("state", "h").
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    _check_int(k, "k", 1)
    if k > n:
        raise InputError(f"k must be <= the {space} dimension {n}, got {k}")
    _check_int(oversample, "oversample", 0)
    if k + oversample > n:
        raise InputError(f"k + oversample must be <= the {space} dimension {n}, got "
                         f"{k} + {oversample}")
    _check_int(max_iter, "max_iter", 1)
    if power_passes is not None:
        _check_int(power_passes, "power_passes", 0)
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0:
        raise InputError(f"tol must be a number > 0, got {tol!r}")
    gen = default_generator(generator)
    device = torch.device(device)
    m = k + oversample

    start, n_init = _init_columns(init, shape, m)
    fill = m - n_init
    if fill > 0:
        draws = torch.randn(n, fill, generator=gen, dtype=torch.float64, device=gen.device)
        draws = draws.to(device)
        start = draws if start is None else torch.cat([start.to(device), draws], dim=1)
    assert start is not None
    V = _orthonormal(start.to(device)).to(dtype)

    out_shape: tuple[int, ...] = ()

    def j_mat(V: torch.Tensor) -> torch.Tensor:  # (n, m) -> (|out|, m)
        nonlocal out_shape
        W = apply_j(V.T.reshape(m, *shape).contiguous()).detach()
        out_shape = tuple(W.shape[1:])
        return W.reshape(m, -1).T

    def jt_mat(W: torch.Tensor) -> torch.Tensor:  # (|out|, m) -> (n, m)
        Z = apply_jt(W.T.reshape(m, *out_shape).contiguous()).detach()
        return Z.reshape(m, -1).T

    W = j_mat(V)
    ritz, s = _rayleigh_ritz(V, W)
    jvps, vjps = m, 0
    residuals: list[float] = []
    angles: list[float] = []
    converged = False
    passes = 0
    limit = max_iter if power_passes is None else power_passes
    while passes < limit:
        V = _orthonormal(jt_mat(W))
        vjps += m
        W = j_mat(V)
        jvps += m
        new_ritz, new_s = _rayleigh_ritz(V, W)
        passes += 1
        residuals.append(_sv_change(s[:k], new_s[:k]))
        angles.append(_largest_angle(ritz[:, :k], new_ritz[:, :k]))
        ritz, s = new_ritz, new_s
        converged = residuals[-1] <= tol and angles[-1] <= math.sqrt(tol)
        if converged and power_passes is None:
            break

    ritz = _sign_fix(ritz).to(dtype)
    vectors = ritz.T.reshape(m, *shape)
    return PowerIterationResult(
        vectors=vectors[:k].contiguous(), singular_values=s[:k].clone(), iterations=passes,
        converged=converged, residuals=residuals, angles=angles,
        extra_vectors=vectors[k:].contiguous() if oversample else None,
        extra_values=s[k:].clone() if oversample else None,
        jvps=jvps, vjps=vjps, warm_start_columns=n_init, random_columns=fill,
        seed=gen.initial_seed() if fill > 0 else None,
    )


# ---------------------------------------------------------------------------------- main API


def _basis_init(init: TangentBasis | torch.Tensor | None, state_shape: tuple[int, ...]
                ) -> torch.Tensor | None:
    """A warm start as a (k', *state_shape) tensor: a basis contributes its oversampling block."""
    if init is None or isinstance(init, torch.Tensor):
        return init
    if isinstance(init, TangentBasis):
        if init.state_shape != state_shape:
            raise InputError(f"init is a basis for states of shape {init.state_shape}, but x has "
                             f"state shape {state_shape}")
        blocks = [init.vectors]
        if init.extra_vectors is not None:
            blocks.append(init.extra_vectors.to(init.vectors))
        return torch.cat(blocks)
    raise InputError(f"init must be a TangentBasis, a tensor or None, "
                     f"got {type(init).__name__}")


def tangent_basis(backbone: Backbone, x: torch.Tensor, t: int, cond: Conditioning | None = None,
                  k: int = 3, output: str = "h", max_iter: int = 50, tol: float = 1e-4,
                  oversample: int = 0, power_passes: int | None = None,
                  init: TangentBasis | torch.Tensor | None = None,
                  generator: torch.Generator | None = None, chunk: int = 16) -> TangentBasis:
    """k leading right singular vectors of J = D output(x) (output "h": the bottleneck).

    Block power iteration on JᵀJ with m = k + ``oversample`` vectors (module docstring;
    the loop itself is :func:`block_power_iteration`). Each pass costs m JVPs and m VJPs; the
    Rayleigh–Ritz step after each pass reuses that pass's JVPs, so a run of q passes costs
    (q + 1)·m JVPs and q·m VJPs in all.

    Stopping:
    - ``power_passes=None`` (default): iterate until, between two successive passes, the relative
      change of every one of the k leading Ritz values is ≤ ``tol`` *and* the largest principal
      angle between the k-dimensional Ritz subspaces is ≤ sqrt(``tol``) (the subspace error is of
      the order of the square root of the singular-value error), or ``max_iter`` passes.
      Successive changes understate the distance to the true subspace by about 1/(1 - ρ), with ρ
      = (σ_{m+1}/σ_k)² the per-pass contraction; oversampling makes ρ smaller.
    - ``power_passes=q``: exactly q passes, no test (the randomized range finder; q = 0 is a
      plain Rayleigh–Ritz step on ``init``, the cheapest warm start). The test quantities are
      still recorded, and ``converged`` says whether the last pass would have met it.

    Choosing settings (``benchmarks/tangent_accuracy.py``, default 32x32 model, k = 3, 50-step
    path): the plain default (p = 0, tol 1e-4) took ~97 products per timestep and stopped up to
    0.2 rad from the converged subspace (leading singular values only a few percent apart);
    ``oversample=4`` warm-started from the previous timestep and iterated to the same tol took
    ~40 products and stayed within 0.007 rad. Prefer a small oversample whenever accuracy matters.

    ``init``: a previous basis (its oversampling vectors included) or a (k', *state_shape) tensor
    to start from; missing columns are Gaussian draws. Every draw uses ``generator``; without one,
    a fresh ``torch.Generator().manual_seed(0)`` is used, so the same call gives the same basis.
    ``x`` must be one state (batch 1) in the backbone's dtype.
    """
    backbone.check_state(x)
    if x.shape[0] != 1:
        raise InputError(f"x must hold one state (batch 1), got a batch of {x.shape[0]}: compute "
                         "one basis per state")
    if x.dtype != backbone.dtype:
        raise InputError(f"x is {x.dtype} but the backbone runs in {backbone.dtype}: cast x or "
                         f"load the backbone with dtype={str(x.dtype).replace('torch.', '')!r}")
    if not torch.isfinite(x).all():
        raise InputError("x contains NaN or infinite values")
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {OUTPUTS}, got {output!r}")
    state_shape = tuple(backbone.state_shape)
    _check_int(k, "k", 1)
    _check_int(chunk, "chunk", 1)
    tt = backbone.timesteps(t, 1)  # validates t (integer, on the training grid)
    t_int = int(tt[0])
    x = x.detach()
    start = _basis_init(init, state_shape)

    def apply_j(V: torch.Tensor) -> torch.Tensor:  # (m, *state) -> (m, 1, *out)
        return batched_jvp(backbone, x, V[:, None], tt, cond, output=output, chunk=chunk)

    def apply_jt(W: torch.Tensor) -> torch.Tensor:  # (m, 1, *out) -> (m, *state)
        Z = batched_vjp(backbone, x, W, tt, cond, output=output, chunk=chunk)
        return Z[:, 0]

    r = block_power_iteration(
        apply_j, apply_jt, state_shape, k, max_iter=max_iter, tol=tol, oversample=oversample,
        power_passes=power_passes, init=start, generator=generator, dtype=x.dtype,
        device=x.device, space="state")
    settings: dict[str, Any] = dict(
        k=k, output=output, max_iter=max_iter, tol=tol, oversample=oversample,
        power_passes=power_passes, chunk=chunk, warm_start_columns=r.warm_start_columns,
        random_columns=r.random_columns, seed=r.seed,
        jvps=r.jvps, vjps=r.vjps, dtype=str(x.dtype).replace("torch.", ""),
    )
    return TangentBasis(
        vectors=r.vectors, singular_values=r.singular_values, timestep=t_int,
        iterations=r.iterations, converged=r.converged, residuals=r.residuals, angles=r.angles,
        settings=settings, extra_vectors=r.extra_vectors, extra_values=r.extra_values,
    )


def tangent_bases_along(backbone: Backbone, trajectory: Trajectory, k: int = 3,
                        cond: Conditioning | None = None, output: str = "h", max_iter: int = 50,
                        tol: float = 1e-4, oversample: int = 0, power_passes: int | None = None,
                        generator: torch.Generator | None = None, chunk: int = 16,
                        warm_start: bool = True, converge_first: bool = True,
                        init: TangentBasis | torch.Tensor | None = None,
                        progress: bool = False) -> dict[int, TangentBasis]:
    """One basis per grid timestep of a batch-1 DDIM ``trajectory`` (the clean level is skipped).

    Timesteps are visited in the trajectory's own order (ascending for an inversion, descending
    for a generation). With ``warm_start`` each basis starts from the previous timestep's (all
    m = k + oversample vectors): the tangent space moves slowly along the path, so few passes
    are needed — ``power_passes=1`` or ``2`` with a small ``oversample`` is the cheap mode. The
    first timestep has nothing to start from (unless ``init`` is given); with ``converge_first``
    (default) it iterates to convergence even when ``power_passes`` is set, since one or two passes
    from random vectors do not give a usable basis for the rest to inherit. One ``generator``
    (default seed 0) feeds every random draw in turn, so the result is reproducible.
    Returns {timestep: basis}, in visiting order.
    """
    if not isinstance(trajectory, Trajectory):
        raise InputError(f"trajectory must be a diffgeo.ddim.Trajectory, "
                         f"got {type(trajectory).__name__}")
    if trajectory.first.shape[0] != 1:
        raise InputError(f"trajectory must be of one image (batch 1), got a batch of "
                         f"{trajectory.first.shape[0]}")
    gen = default_generator(generator)
    steps = [(t, x) for t, x in zip(trajectory.timesteps, trajectory.states, strict=True)
             if t is not None]
    if not steps:
        raise InputError("trajectory has no noisy timesteps (only the clean level)")
    out: dict[int, TangentBasis] = {}
    prev: TangentBasis | torch.Tensor | None = init
    for i, (t, x) in enumerate(tqdm(steps, desc="tangent", disable=not progress, leave=False)):
        cold = prev is None
        passes = None if (warm_start and cold and converge_first) else power_passes
        basis = tangent_basis(backbone, x, t, cond, k=k, output=output, max_iter=max_iter,
                              tol=tol, oversample=oversample, power_passes=passes, init=prev,
                              generator=gen, chunk=chunk)
        basis.settings["warm_started"] = not cold
        basis.settings["index"] = i
        out[t] = basis
        prev = basis if warm_start else None
    return out
