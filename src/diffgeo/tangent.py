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
vectors that make a couple of passes enough; with ``power_passes=None`` it iterates until every
returned Ritz pair (σ, v) has a small residual ‖JᵀJ v − σ² v‖ relative to σ². The residuals come
from the VJPs the next pass needs anyway (JᵀJ v = Jᵀ(J V p)), and with the first Ritz value
outside the k returned ones they give a Davis–Kahan bound on the angle to the exact subspace,
reported with every basis (:class:`PowerIterationConfig` states what is guaranteed). The options
of the iteration live in that one frozen config, shared by this module and RBE.

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

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from diffgeo.backbones.base import Backbone, Conditioning
from diffgeo.errors import InputError, check_int
from diffgeo.jacobian import OUTPUTS, batched_jvp, batched_vjp
from diffgeo.sampling import Trajectory
from diffgeo.sampling.flow import time_value

__all__ = ["DEFAULT_SEED", "PowerIterationConfig", "PowerIterationResult", "TangentBasis",
           "block_power_iteration", "power_config", "principal_angles", "tangent_basis",
           "tangent_bases_along"]

DEFAULT_SEED = 0  # seed of the generator used when none is given: same call, same basis


@dataclass
class TangentBasis:
    """k leading right singular vectors of D output(X_t) at one state, with how they were found.

    ``vectors``: (k, *state_shape), orthonormal when flattened. ``singular_values``: (k,),
    descending (float64: they are Ritz values of the small matrix J V). ``residuals[i]`` /
    ``error_bounds[i]``: after i passes (i = 0 .. ``iterations``), the largest relative residual
    ‖JᵀJv − σ²v‖/σ² of the k returned pairs and the angle bound (radians, None without a gap
    estimate); ``error_bound`` is the last one: see :class:`PowerIterationConfig` for what it
    guarantees. ``converged``: the residual test passed for the returned pairs (also recorded for
    ``power_passes`` runs, which do not stop on it). ``exact``: the block spanned the whole space
    J acts on, so the pairs are exact up to round-off. ``extra_vectors`` / ``extra_values``: the
    oversampling Ritz pairs (k+1..m), kept so that a warm start can reuse the whole block.
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    timestep: int
    iterations: int
    converged: bool
    residuals: list[float] = field(default_factory=list)
    error_bounds: list[float | None] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    extra_vectors: torch.Tensor | None = None
    extra_values: torch.Tensor | None = None
    exact: bool = False

    @property
    def error_bound(self) -> float | None:
        """Angle bound (radians) of the returned subspace; see :class:`PowerIterationConfig`."""
        return self.error_bounds[-1] if self.error_bounds else None

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


def _rayleigh_ritz(V: torch.Tensor, W: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz vectors (n, m), values (m,) and the rotation P (m, m) of J on span(V), given W = J V.

    The SVD of the small matrix W = U S Pᵀ gives J (V P) = U S: the columns of V P are the best
    approximations to J's right singular vectors within span(V), with values S (descending).
    Computed in float64 whatever the model's dtype: the matrices are small. W must have at least
    as many rows as columns (the caller clamps the block), so P is square.
    """
    _, s, ph = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    return V.to(torch.float64) @ ph.T, s, ph.T


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


# ---------------------------------------------------------------------------------- config


# A residual this small relative to σ₁² (in units of the products' machine epsilon) is round-off:
# the arithmetic of J·v and Jᵀ·w cannot resolve it, so the test accepts it whatever tol says
# (the iteration stalls at a few eps on the test models; 64 leaves room for deeper networks).
_ROUNDOFF = 64.0  # PowerIterationConfig's docstring states this number


@dataclass(frozen=True)
class PowerIterationConfig:
    """Options of :func:`block_power_iteration`, validated once, here, for every caller
    (:func:`tangent_basis`, :func:`tangent_bases_along`, RBE discovery).

    ``k``: singular pairs returned. ``oversample``: extra vectors iterated with them; the block
    has m = k + oversample vectors, clamped to the dimension of the space J acts on (and to the
    dimension of its output, which bounds J's rank). ``max_iter``: most passes when iterating to
    convergence. ``tol``: the residual tolerance below. ``power_passes``: None iterates until the
    test passes (or ``max_iter`` passes); q runs exactly q passes and only reports the test.

    What the results say, for the k returned Ritz pairs (σ̃ᵢ, vᵢ) with residuals
    rᵢ = JᵀJ vᵢ − σ̃ᵢ² vᵢ (R the n×k block of them):

    - ``converged``: every ‖rᵢ‖ ≤ ``tol``·σ̃ᵢ² + 64·eps·σ̃₁² (eps of the products' dtype: a
      residual below that is round-off the arithmetic cannot resolve). Guaranteed then: each σ̃ᵢ²
      lies within ‖rᵢ‖ of an exact σ² of J (the residual bound for symmetric matrices), and no
      σ̃ᵢ exceeds the exact σᵢ (interlacing).
    - ``error_bound`` (radians): arcsin(‖R‖₂ / (σ̃ₖ² − λ̂)) with λ̂ = σ̃ₖ₊₁² + ‖rₖ₊₁‖, the first
      Ritz pair outside the k (so it needs ``oversample`` ≥ 1). By the Davis–Kahan sin θ theorem
      the largest principal angle between span(v₁..vₖ) and the exact top-k right singular
      subspace is at most this whenever σₖ₊₁² ≤ λ̂: an exact σ² lies within ‖rₖ₊₁‖ of σ̃ₖ₊₁²,
      and it is σₖ₊₁² unless the block has missed a singular direction entirely (a start block
      almost orthogonal to it: the blind spot of every method built on products). π/2 (no
      information) when σ̃ₖ² ≤ λ̂: the gap is not resolved, e.g. σₖ = σₖ₊₁, where the subspace
      itself is not determined. None with ``oversample=0``: no pair outside the block measures
      the gap. Where k equals the bound on J's rank, σₖ₊₁ = 0 is known and the bound holds
      without the proviso.
    - ``exact``: the block spans the whole input space (m = n: Rayleigh–Ritz alone is exact) or,
      after one pass, J's whole row space (m = the output dimension): the pairs are exact up to
      round-off, and no further pass is run.
    """

    k: int = 3
    oversample: int = 1
    max_iter: int = 50
    tol: float = 1e-4
    power_passes: int | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise the validated values in place
        put(self, "k", check_int(self.k, "k", 1))
        put(self, "oversample", check_int(self.oversample, "oversample", 0))
        put(self, "max_iter", check_int(self.max_iter, "max_iter", 1))
        if self.power_passes is not None:
            put(self, "power_passes", check_int(self.power_passes, "power_passes", 0))
        tol = self.tol
        if (isinstance(tol, bool) or not isinstance(tol, numbers.Real)
                or not math.isfinite(tol) or not tol > 0):
            raise InputError(f"tol must be a finite number > 0, got {tol!r}")
        put(self, "tol", float(tol))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(PowerIterationConfig))


def power_config(config: PowerIterationConfig | None = None, **options: Any
                 ) -> PowerIterationConfig:
    """``config`` (default ``PowerIterationConfig()``) with each option that is not None
    replacing its field: how functions that take both a config and the option keywords combine
    them. (A config's ``power_passes=q`` is turned back into iterating with
    ``dataclasses.replace(config, power_passes=None)``.)"""
    if config is None:
        config = PowerIterationConfig()
    elif not isinstance(config, PowerIterationConfig):
        raise InputError(f"config must be a PowerIterationConfig or None, "
                         f"got {type(config).__name__}")
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise InputError(f"unknown power-iteration option(s) {', '.join(unknown)}: expected "
                         f"{', '.join(sorted(_CONFIG_FIELDS))}")
    changes = {name: v for name, v in options.items() if v is not None}
    return dataclasses.replace(config, **changes) if changes else config


# ---------------------------------------------------------------------------------- generic core


@dataclass
class PowerIterationResult:
    """What :func:`block_power_iteration` found: k leading right singular pairs of an operator J.

    ``vectors`` (k, *shape), orthonormal when flattened, signed by the module's convention;
    ``singular_values`` (k,) float64, descending; ``extra_vectors`` / ``extra_values``: the other
    Ritz pairs of the block (None when it has only k); ``residuals`` / ``error_bounds``: the
    largest relative residual and the angle bound after each pass count 0 .. ``iterations``;
    ``converged``, ``exact``, ``error_bound``: see :class:`PowerIterationConfig`;
    ``block_size``: m after clamping; ``config``: the options used; ``jvps`` / ``vjps``: how many
    products J·v and Jᵀ·w were applied (the cost); ``warm_start_columns`` / ``random_columns``:
    how the start block was made, ``seed`` the generator's initial seed when random columns were
    drawn.
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    iterations: int
    converged: bool
    residuals: list[float]
    error_bounds: list[float | None]
    extra_vectors: torch.Tensor | None
    extra_values: torch.Tensor | None
    jvps: int
    vjps: int
    warm_start_columns: int
    random_columns: int
    seed: int | None
    exact: bool = False
    block_size: int = 0
    config: PowerIterationConfig = field(default_factory=PowerIterationConfig)

    @property
    def error_bound(self) -> float | None:
        return self.error_bounds[-1] if self.error_bounds else None


def _angle_bound(R: torch.Tensor, theta: torch.Tensor, norms: torch.Tensor, k: int, m: int,
                 n: int, rank_bound: int) -> float | None:
    """Davis–Kahan bound (radians) for the k leading Ritz vectors; :class:`PowerIterationConfig`.

    ``R`` (n, k): their residuals; ``theta``: the m Ritz values of JᵀJ; ``norms``: the residual
    norms of (at least) the first min(m, k + 1) pairs.
    """
    if k == n:
        return 0.0  # nothing outside the block to be confused with
    if k < m:
        outside = float(theta[k] + norms[k])
    elif k >= rank_bound:
        outside = 0.0  # J has at most rank_bound nonzero singular values: σ_{k+1} = 0 exactly
    else:
        return None
    gap = float(theta[k - 1]) - outside
    if not gap > 0:
        return math.pi / 2
    sin = float(torch.linalg.svdvals(R).max()) / gap
    return math.asin(min(1.0, sin))


def block_power_iteration(
    apply_j: Callable[[torch.Tensor], torch.Tensor],
    apply_jt: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    k: int | PowerIterationConfig,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    oversample: int | None = None,
    power_passes: int | None = None,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    space: str = "input",
) -> PowerIterationResult:
    """k leading right singular vectors of a linear operator J known only through products.

    ``apply_j`` maps a batch of c input vectors (c, *shape) to J·V (c, *out_shape); ``apply_jt``
    maps a batch (c, *out_shape) back to Jᵀ·W (c, *shape). Both receive tensors in ``dtype`` on
    ``device``, contiguous. This is the loop :func:`tangent_basis` runs on D h(x) and RBE runs on
    the masked decoder Jacobian ∂(M ⊙ ε)/∂h: block power (subspace) iteration on JᵀJ with a block
    of m vectors, QR every pass (deflation never relies on round-off), a Rayleigh–Ritz step in
    float64 after every pass, and the sign convention of this module.

    ``k`` is a :class:`PowerIterationConfig`, or the number of pairs with the other options as
    keywords (None: the config's default); a keyword given with a config replaces its field.
    Each check of the residual test needs Jᵀ applied to the block's outputs, which is the next
    pass's VJPs, so iterating costs nothing extra; the final check of a run that stops without
    passing it (``power_passes`` or ``max_iter`` reached) applies Jᵀ to the min(m, k + 1) pairs
    the test and the bound need. A run of q passes thus costs (q + 1)·m JVPs and q·m VJPs plus
    that last check (m VJPs when it passed while iterating). k larger than the space, or than
    J's output (J then has fewer than k nonzero singular values), is refused; m is clamped.

    ``init``: (k', *shape) start vectors (truncated to m; missing columns are Gaussian draws from
    ``generator``, default a fresh generator seeded 0). ``space`` names the input space in error
    messages ("state", "h").
    """
    if isinstance(k, PowerIterationConfig):
        cfg = power_config(k, max_iter=max_iter, tol=tol, oversample=oversample,
                           power_passes=power_passes)
    else:
        cfg = power_config(None, k=k, max_iter=max_iter, tol=tol, oversample=oversample,
                           power_passes=power_passes)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    k = cfg.k
    if k > n:
        raise InputError(f"k must be <= the {space} dimension {n}, got {k}")
    # More vectors than dimensions cannot be orthonormal; the whole space is then exact anyway.
    m = min(k + cfg.oversample, n)
    gen = default_generator(generator)
    device = torch.device(device)

    start, n_init = _init_columns(init, shape, m)
    fill = m - n_init
    if fill > 0:
        draws = torch.randn(n, fill, generator=gen, dtype=torch.float64, device=gen.device)
        draws = draws.to(device)
        start = draws if start is None else torch.cat([start.to(device), draws], dim=1)
    assert start is not None
    V = _orthonormal(start.to(device)).to(dtype)

    out_shape: tuple[int, ...] = ()

    def j_mat(V: torch.Tensor) -> torch.Tensor:  # (n, c) -> (|out|, c)
        nonlocal out_shape
        c = V.shape[1]
        W = apply_j(V.T.reshape(c, *shape).contiguous()).detach()
        out_shape = tuple(W.shape[1:])
        return W.reshape(c, -1).T

    def jt_mat(W: torch.Tensor) -> torch.Tensor:  # (|out|, c) -> (n, c)
        c = W.shape[1]
        Z = apply_jt(W.T.reshape(c, *out_shape).contiguous()).detach()
        return Z.reshape(c, -1).T

    W = j_mat(V)
    jvps, vjps = m, 0
    d_out = int(W.shape[0])
    if k > d_out:
        raise InputError(f"k must be <= {d_out}: J maps the {n}-dimensional {space} space to "
                         f"{d_out} dimensions, so it has at most {d_out} nonzero singular "
                         f"values, got k={k}")
    if m > d_out:  # the rank is at most d_out: a larger block only adds null directions
        V, W, m = V[:, :d_out], W[:, :d_out], d_out
    full = m == n
    limit = cfg.max_iter if cfg.power_passes is None else cfg.power_passes
    if full:
        limit = 0  # span(V) is the whole space: the Rayleigh–Ritz step is already exact
    elif m == d_out:
        limit = min(limit, 1)  # one pass makes span(V) = range(Jᵀ), J's whole row space
    eps = torch.finfo(dtype).eps
    f64 = torch.float64

    ritz, s, P = _rayleigh_ritz(V, W)
    residuals: list[float] = []
    bounds: list[float | None] = []
    passes = 0
    while True:
        last = passes >= limit
        c = min(m, k + 1) if last else m
        # JᵀJ (V P) = Jᵀ (W P): the residuals of the Ritz pairs, and (same span as Jᵀ W) the
        # next pass's block.
        Z = jt_mat((W.to(f64) @ P[:, :c]).to(dtype))
        vjps += c
        theta = s.square()
        R = Z.to(f64) - ritz[:, :c] * theta[:c]
        norms = R.norm(dim=0)
        top = theta[:k].clamp_min(torch.finfo(f64).tiny)
        residuals.append(float((norms[:k] / top).max()))
        noise = _ROUNDOFF * eps * float(theta[0])
        converged = bool((norms[:k] <= cfg.tol * theta[:k] + noise).all())
        bounds.append(_angle_bound(R[:, :k], theta, norms, k, m, n, d_out))
        if last or (converged and cfg.power_passes is None):
            break
        V = _orthonormal(Z)
        W = j_mat(V)
        jvps += m
        ritz, s, P = _rayleigh_ritz(V, W)
        passes += 1

    # The row-space case needs J V to have had full rank (a warm start could lack it): the
    # residual test then confirms what the structure promises.
    exact = full or (m == d_out and passes >= 1 and converged)
    converged = converged or full
    ritz = _sign_fix(ritz).to(dtype)
    vectors = ritz.T.reshape(m, *shape)
    return PowerIterationResult(
        vectors=vectors[:k].contiguous(), singular_values=s[:k].clone(), iterations=passes,
        converged=converged, residuals=residuals, error_bounds=bounds,
        extra_vectors=vectors[k:].contiguous() if m > k else None,
        extra_values=s[k:m].clone() if m > k else None,
        jvps=jvps, vjps=vjps, warm_start_columns=min(n_init, m), random_columns=fill,
        seed=gen.initial_seed() if fill > 0 else None, exact=exact, block_size=m, config=cfg,
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
                  k: int | None = None, output: str = "h", max_iter: int | None = None,
                  tol: float | None = None, oversample: int | None = None,
                  power_passes: int | None = None,
                  init: TangentBasis | torch.Tensor | None = None,
                  generator: torch.Generator | None = None, chunk: int = 16, *,
                  config: PowerIterationConfig | None = None) -> TangentBasis:
    """k leading right singular vectors of J = D output(x) (output "h": the bottleneck).

    Block power iteration on JᵀJ with m = k + ``oversample`` vectors (module docstring; the loop
    itself is :func:`block_power_iteration`, whose docstring counts the products). The options
    are a :class:`PowerIterationConfig` (``config``; default k = 3, oversample = 1, tol = 1e-4,
    max_iter = 50); ``k``, ``max_iter``, ``tol``, ``oversample``, ``power_passes`` are shorthand
    for its fields and replace them when given.

    Stopping:
    - ``power_passes=None`` (default): iterate until every returned pair's residual
      ‖JᵀJv − σ²v‖ is ≤ ``tol``·σ², or ``max_iter`` passes. ``converged``, ``error_bound`` and
      ``exact`` say what was reached and what that guarantees (:class:`PowerIterationConfig`).
      The residual bounds the singular values; the subspace error is about the residual divided
      by the relative gap (σₖ² − σₖ₊₁²)/σₖ², which ``error_bound`` measures. Per pass the error
      contracts by about ρ = (σ_{m+1}/σ_k)², so a few oversampling vectors make a small gap cheap.
    - ``power_passes=q``: exactly q passes, no stopping test (the randomized range finder; q = 0 is
      a plain Rayleigh–Ritz step on ``init``, the cheapest warm start). The residual test and the
      bound are still evaluated for the returned pairs.

    Choosing settings: ``benchmarks/tangent_accuracy.py`` measures cost and accuracy of cold,
    warm-started and fixed-pass runs against a tightly converged reference along a path.

    ``init``: a previous basis (its oversampling vectors included) or a (k', *state_shape) tensor
    to start from; missing columns are Gaussian draws. Every draw uses ``generator``; without one,
    a fresh ``torch.Generator().manual_seed(0)`` is used, so the same call gives the same basis.
    ``x`` must be one state (batch 1) in the backbone's dtype.
    """
    cfg = power_config(config, k=k, max_iter=max_iter, tol=tol, oversample=oversample,
                       power_passes=power_passes)
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
    check_int(chunk, "chunk", 1)
    tt = backbone.timesteps(t, 1)  # validates t (integer, on the training grid; flow: σ·T)
    t_int = time_value(tt)
    x = x.detach()
    start = _basis_init(init, state_shape)

    def apply_j(V: torch.Tensor) -> torch.Tensor:  # (m, *state) -> (m, 1, *out)
        return batched_jvp(backbone, x, V[:, None], tt, cond, output=output, chunk=chunk)

    def apply_jt(W: torch.Tensor) -> torch.Tensor:  # (m, 1, *out) -> (m, *state)
        Z = batched_vjp(backbone, x, W, tt, cond, output=output, chunk=chunk)
        return Z[:, 0]

    r = block_power_iteration(apply_j, apply_jt, state_shape, cfg, init=start,
                              generator=generator, dtype=x.dtype, device=x.device,
                              space="state")
    settings: dict[str, Any] = dict(
        **cfg.to_dict(), output=output, chunk=chunk, block_size=r.block_size, exact=r.exact,
        error_bound=r.error_bound, warm_start_columns=r.warm_start_columns,
        random_columns=r.random_columns, seed=r.seed,
        jvps=r.jvps, vjps=r.vjps, dtype=str(x.dtype).replace("torch.", ""),
    )
    return TangentBasis(
        vectors=r.vectors, singular_values=r.singular_values, timestep=t_int,
        iterations=r.iterations, converged=r.converged, residuals=r.residuals,
        error_bounds=r.error_bounds, settings=settings, extra_vectors=r.extra_vectors,
        extra_values=r.extra_values, exact=r.exact,
    )


def tangent_bases_along(backbone: Backbone, trajectory: Trajectory, k: int | None = None,
                        cond: Conditioning | None = None, output: str = "h",
                        max_iter: int | None = None, tol: float | None = None,
                        oversample: int | None = None, power_passes: int | None = None,
                        generator: torch.Generator | None = None, chunk: int = 16,
                        warm_start: bool = True, converge_first: bool = True,
                        init: TangentBasis | torch.Tensor | None = None,
                        progress: bool = False, *,
                        config: PowerIterationConfig | None = None) -> dict[int, TangentBasis]:
    """One basis per grid timestep of a batch-1 DDIM ``trajectory`` (the clean level is skipped).

    Timesteps are visited in the trajectory's own order (ascending for an inversion, descending
    for a generation). With ``warm_start`` each basis starts from the previous timestep's (all
    m = k + oversample vectors): the tangent space moves slowly along the path, so few passes
    are needed — ``power_passes=1`` or ``2`` with a small ``oversample`` is the cheap mode. The
    first timestep has nothing to start from (unless ``init`` is given); with ``converge_first``
    (default) it iterates to convergence even when ``power_passes`` is set, since one or two passes
    from random vectors do not give a usable basis for the rest to inherit. One ``generator``
    (default seed 0) feeds every random draw in turn, so the result is reproducible. Options as
    in :func:`tangent_basis` (``config`` and its shorthand keywords).
    Returns {timestep: basis}, in visiting order.
    """
    cfg = power_config(config, k=k, max_iter=max_iter, tol=tol, oversample=oversample,
                       power_passes=power_passes)
    if not isinstance(trajectory, Trajectory):
        raise InputError(f"trajectory must be a diffgeo.sampling.Trajectory, "
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
        step = (dataclasses.replace(cfg, power_passes=None)
                if (warm_start and cold and converge_first) else cfg)
        basis = tangent_basis(backbone, x, t, cond, output=output, init=prev, generator=gen,
                              chunk=chunk, config=step)
        basis.settings["warm_started"] = not cold
        basis.settings["index"] = i
        out[t] = basis
        prev = basis if warm_start else None
    return out
