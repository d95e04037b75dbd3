"""Region-based editing: discovery against an explicit-Jacobian oracle, Eq. 14, Asyrp steps.

Models: (1) a small custom pixel U-Net (8x8 images, h = 16x4x4 = 256 dims, attention and
GroupNorm groups of 2-4 channels) in float64, whose decoder Jacobian ∂ε/∂h is formed explicitly
by reverse mode through ``Backbone.eps_from_h`` (a code path independent of RBE's batched
decoder JVP/VJP) and decomposed with a dense SVD; (2) the tiny-16 pixel U-Net of the other tests
(h = 32x8x8) in float32 for editing, locality, determinism and input checks.

What is *not* asserted, and why. Survey on tiny-16 (8 images x 3 boxes, α = ±0.3, defaults
otherwise): the edit-level locality (MSE inside / outside) of the RBE direction beat the global
(whole-ε) direction in 24 of 24 cases (median 1.97x; one near-tie, 2.97 vs 2.95), so one
fixture with a clear margin is asserted. Against the *masked, unprojected* direction it won only
18 of 24, by at most 7%: projecting out one unmasked direction of an untrained network moves the
edit little, so that comparison is not asserted. At the discovery timestep the effect of the
projection is provable and is asserted instead (``test_projection_reduces_the_unmasked_response``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffgeo import sampling
from diffgeo.backbones import FunctionalBackbone, linear_gaussian, load_backbone
from diffgeo.editing import rbe
from diffgeo.editing.rbe import (
    Directions,
    RBEConfig,
    RBEEditConfig,
    apply_direction,
    asymmetric_step,
    directions_at,
    discover_directions,
    global_directions,
    masked_response,
    project_out,
    state_mask,
)
from diffgeo.errors import DiffgeoError, InputError, OutputExistsError
from diffgeo.io import box_mask
from diffgeo.tangent import PowerIterationConfig, principal_angles

T = 500
STEPS = 40


# ---------------------------------------------------------------------------------- fixtures
def _export(folder: Path, unet) -> Path:
    from diffgeo.train import export_model

    return export_model(unet, folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-16 (16x16 images, h = 32x8x8), float32."""
    from diffgeo.train import build_unet

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = build_unet("tiny-16")
    return load_backbone(_export(tmp_path_factory.mktemp("rbe") / "tiny16", unet))


@pytest.fixture(scope="module")
def small64(tmp_path_factory):
    """A smaller U-Net for the explicit oracle: 8x8, h = 16x4x4 = 256 dims, float64."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(3)
        unet = UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
            attention_head_dim=8,
        )
    return load_backbone(_export(tmp_path_factory.mktemp("rbe") / "small8", unet),
                         dtype="float64")


def _image(bb, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, *bb.state_shape, generator=g, dtype=torch.float64) * 2 - 1
    return x.to(bb.dtype)


SMALL_MASK = box_mask((1, 2, 5, 6), (8, 8))


@pytest.fixture(scope="module")
def oracle(small64):
    """X_t (DDIM inversion to t = 500, 40 steps) and the dense Jacobian ∂ε/∂h there."""
    x0 = _image(small64, 1)
    xt = sampling.invert(small64, x0, T, STEPS).last
    enc = small64.encode(xt, T)
    h = enc.h.detach()

    def f(hh: torch.Tensor) -> torch.Tensor:
        return small64.eps_from_h(xt, T, hh, encoded=enc).reshape(-1)

    with small64.derivative_mode():
        J = torch.autograd.functional.jacobian(f, h).reshape(-1, h.numel())
    m = state_mask(small64, SMALL_MASK).expand(1, *small64.state_shape).reshape(-1, 1)
    return dict(x0=x0, xt=xt, J=J, JM=m * J, JU=(1 - m) * J)


@pytest.fixture(scope="module")
def oracle_dirs(small64, oracle):
    """Converged region directions (tight tolerance, oversampling: the untrained net's leading
    singular values are only a few percent apart), with both projections."""
    return {pa: directions_at(small64, oracle["xt"], T, SMALL_MASK,
                              RBEConfig(k=3, tol=1e-9, max_iter=400, oversample=4,
                                        project_against=pa), num_steps=STEPS)
            for pa in ("leading", "subspace")}


def _svd(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, S, Vh = torch.linalg.svd(J, full_matrices=False)
    return S, Vh


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).to(torch.float64)


def _assert_orthonormal_signed(V: torch.Tensor) -> None:
    F = _flat(V)
    assert torch.allclose(F @ F.T, torch.eye(F.shape[0], dtype=F.dtype), atol=1e-10)
    for v in F:
        assert v[v.abs().argmax()] > 0, "sign convention: largest |component| positive"


# ---------------------------------------------------------------------------------- (a) oracle
@pytest.mark.parametrize("which", ["masked", "unmasked"])
def test_power_iteration_matches_explicit_svd(oracle, oracle_dirs, which):
    d = oracle_dirs["subspace"]
    J = oracle["JM"] if which == "masked" else oracle["JU"]
    S, Vh = _svd(J)
    assert not math.isclose(float(S[0]), float(S[1]), rel_tol=1e-3)  # distinct leading values
    vecs = d.raw_vectors if which == "masked" else d.unmasked_vectors
    vals = d.singular_values if which == "masked" else d.unmasked_values
    run = d.settings["masked_run" if which == "masked" else "unmasked_run"]
    assert run["converged"]
    assert vecs.shape == (3, 16, 4, 4) and vals.dtype == torch.float64
    assert float((vals / S[:3] - 1).abs().max()) <= 1e-2
    assert bool((vals[:-1] >= vals[1:]).all())
    cos = (_flat(vecs) @ Vh[:3].T).diagonal().abs()
    assert float(cos.min()) >= 0.99
    # Deflation by QR, not round-off: three distinct, orthonormal, signed vectors.
    _assert_orthonormal_signed(vecs)


def test_default_discovery_converges_where_it_says_and_bounds_its_error(small64, oracle):
    """At the default tolerance the former stopping rule (successive changes of the Ritz values
    and subspace) declared J_M's top 5 converged 0.03 rad from the exact span. "Converged" now
    means residuals ≤ tol·σ², and the bound reported for each run covers its true angle."""
    k = 5
    d = directions_at(small64, oracle["xt"], T, SMALL_MASK, RBEConfig(k=k))
    bounds = []
    for J, vecs, run in ((oracle["JM"], d.raw_vectors, "masked_run"),
                         (oracle["JU"], d.unmasked_vectors, "unmasked_run")):
        S, Vh = _svd(J)
        angle = float(principal_angles(_flat(vecs).T, Vh[:k].T).max())
        summary = d.settings[run]
        assert summary["converged"] and angle <= summary["error_bound"] < 1e-2, run
        assert summary["block_size"] == k + 1 and not summary["exact"]
        bounds.append(summary["error_bound"])
    assert d.converged and d.error_bound == max(bounds)
    assert d.settings["oversample"] == rbe.RBEConfig().oversample == 1
    # RBE's config is a power-iteration config: its power part is the paper's k=3, 50 passes.
    assert rbe.RBEConfig().power == PowerIterationConfig(k=3, max_iter=50)
    c = directions_at(small64, oracle["xt"], T, SMALL_MASK, RBEConfig(k=k, t=T))
    assert torch.equal(c.vectors, d.vectors) and c.settings == d.settings
    with pytest.raises(InputError, match="config.t=480 but the state is at t=500"):
        directions_at(small64, oracle["xt"], T, SMALL_MASK, RBEConfig(t=480))


def test_discovery_block_larger_than_h_is_clamped_and_exact():
    """h has 16 dimensions: k = 15 with oversample 4 used to be refused (k + oversample > 16)
    and now iterates the whole h-space, which is exact (no pass needed); k = 16 likewise;
    k = 17 is refused. J = ∂ε/∂h = Q is orthogonal: every singular value is 1, so which 15 of
    them span "the top 15" is not determined (bound π/2), while k = 16 is the whole space."""
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g, dtype=torch.float64)
    bb = linear_gaussian(torch.zeros(16), A @ A.T / 16, ac, state_shape=(1, 4, 4))
    x = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    for k, oversample in ((15, 4), (16, 0), (16, 1)):
        d = directions_at(bb, x, 100, None, RBEConfig(k=k, oversample=oversample))
        run = d.settings["masked_run"]
        assert run["exact"] and run["converged"] and run["iterations"] == 0
        assert run["block_size"] == 16
        assert run["error_bound"] == (0.0 if k == 16 else pytest.approx(math.pi / 2))
        assert torch.allclose(d.singular_values, torch.ones(k, dtype=torch.float64), rtol=1e-12)
        _assert_orthonormal_signed(d.vectors)
    with pytest.raises(InputError, match="h dimension 16"):
        directions_at(bb, x, 100, None, RBEConfig(k=17))


def test_global_directions_match_the_svd_of_the_whole_jacobian(small64, oracle):
    d = global_directions(small64, oracle["x0"],
                          RBEConfig(t=T, k=2, tol=1e-9, max_iter=400, oversample=4), grid=STEPS)
    S, Vh = _svd(oracle["J"])
    assert d.mask is None and d.unmasked_vectors is None
    assert d.settings["kind"] == "global" and torch.equal(d.vectors, d.raw_vectors)
    assert float((d.singular_values / S[:2] - 1).abs().max()) <= 1e-2
    assert float((_flat(d.vectors) @ Vh[:2].T).diagonal().abs().min()) >= 0.99


def test_discover_equals_directions_at_the_inverted_state(small64, oracle, oracle_dirs):
    d = discover_directions(small64, oracle["x0"], SMALL_MASK,
                            RBEConfig(t=T, k=3, tol=1e-9, max_iter=400, oversample=4,
                                      project_against="subspace"), grid=STEPS)
    ref = oracle_dirs["subspace"]
    assert torch.equal(d.vectors, ref.vectors) and d.timestep == T and d.num_steps == STEPS
    assert d.settings["mask_rule"] == rbe.MASK_RULE


# ---------------------------------------------------------------------------------- (b) Eq. 14
def test_projected_directions_are_orthogonal_to_what_they_were_projected_against(oracle_dirs):
    lead, sub = oracle_dirs["leading"], oracle_dirs["subspace"]
    u = _flat(lead.unmasked_vectors)
    # "leading": orthogonal to u1 (Eq. 14), and equal to v - (v.u1) u1 normalised.
    P = _flat(lead.vectors)
    assert float((P @ u[0]).abs().max()) < 1e-10
    V = _flat(lead.raw_vectors)
    manual = V - (V @ u[0])[:, None] * u[0]
    manual = manual / manual.norm(dim=1, keepdim=True)
    assert torch.allclose(P, manual, atol=1e-12)
    assert bool(((P * V).sum(1) > 0).all())  # orientation kept
    assert torch.allclose(P.norm(dim=1), torch.ones(3, dtype=P.dtype), atol=1e-12)
    # "subspace": orthogonal to all k_u unmasked vectors.
    Q = _flat(sub.vectors)
    assert float((Q @ _flat(sub.unmasked_vectors).T).abs().max()) < 1e-10
    assert torch.allclose(torch.tensor(lead.settings["projection_norms"], dtype=P.dtype),
                          (V - (V @ u[0])[:, None] * u[0]).norm(dim=1), atol=1e-12)


def test_project_out_refuses_a_vector_inside_the_basis():
    e = torch.eye(4, dtype=torch.float64)
    out, norms = project_out(e[:2] + 0.5 * e[2], e[2:3])
    assert torch.allclose(out, e[:2]) and torch.allclose(norms, torch.ones(2, dtype=e.dtype))
    with pytest.raises(DiffgeoError, match="inside the unmasked subspace"):
        project_out(e[2:3], e[2:4])


# ---------------------------------------------------------------------------------- (d) locality
def test_projection_reduces_the_unmasked_response(small64, oracle, oracle_dirs):
    """At the discovery timestep, with J_U = (1 - M) ⊙ ∂ε/∂h:
    - "leading": ‖J_U v'‖ ≤ ‖J_U v‖ exactly, since v' = w/‖w‖ with v = c·u1 + w gives
      ‖J_U v'‖² = ‖J_U w‖²/‖w‖² ≤ σ1² and so (‖J_U v‖² - c²σ1²)/(1 - c²) ≤ ‖J_U v‖²;
    - "subspace": v' ⟂ the top k_u right singular vectors, so ‖J_U v'‖ ≤ σ_{k_u+1}(J_U).
    The out/in response ratio is not guaranteed to drop (‖J_M v'‖ drops too); on this fixture
    it does, by a clear margin, and that is asserted as an observation."""
    JU, JM = oracle["JU"], oracle["JM"]
    SU, _ = _svd(JU)
    lead, sub = oracle_dirs["leading"], oracle_dirs["subspace"]
    raw = _flat(lead.raw_vectors)
    out_raw = (JU @ raw.T).norm(dim=0)
    out_lead = (JU @ _flat(lead.vectors).T).norm(dim=0)
    assert bool((out_lead <= out_raw * (1 + 1e-9)).all())
    out_sub = (JU @ _flat(sub.vectors).T).norm(dim=0)
    assert bool((out_sub <= SU[3] * (1 + 1e-6)).all())
    in_raw = (JM @ raw.T).norm(dim=0)
    in_lead = (JM @ _flat(lead.vectors).T).norm(dim=0)
    assert float(out_lead[0] / in_lead[0]) < 0.9 * float(out_raw[0] / in_raw[0])
    # The response stored in the settings is the same quantity (batched decoder JVPs).
    resp = lead.settings["response"]
    assert np.allclose(resp["raw"]["outside"], out_raw.numpy(), rtol=1e-8)
    assert np.allclose(resp["projected"]["inside"], in_lead.numpy(), rtol=1e-8)
    ms = state_mask(small64, SMALL_MASK)
    again = masked_response(small64, oracle["xt"], T, lead.vectors, ms)
    assert torch.allclose(again["outside"], out_lead, rtol=1e-8)


TINY_MASK = box_mask((8, 2, 14, 14), (16, 16))


@pytest.fixture(scope="module")
def tiny_dirs(tiny):
    x0 = _image(tiny, 1)
    return x0, {
        "rbe": discover_directions(tiny, x0, TINY_MASK, RBEConfig(t=T), grid=STEPS),
        "global": global_directions(tiny, x0, RBEConfig(t=T), grid=STEPS),
    }


def test_region_direction_edits_more_locally_than_the_global_one(tiny, tiny_dirs):
    """Edit-level locality (the paper's Fig. 7 measure) in the linear regime (α = ±0.3 on an
    untrained net; ±30 saturates it): MSE inside / outside the box, summed over both signs."""
    x0, dirs = tiny_dirs
    ratios = {}
    for name, d in dirs.items():
        res = apply_direction(tiny, x0, d, 0, [-0.3, 0.3])
        loc = res.locality(TINY_MASK)
        assert all(lc.mse_inside > 0 and lc.mse_outside > 0 for lc in loc)
        ratios[name] = sum(lc.mse_inside for lc in loc) / sum(lc.mse_outside for lc in loc)
    assert ratios["rbe"] > 2 * ratios["global"], ratios


# ---------------------------------------------------------------------------------- (c) Asyrp
def test_asymmetric_step_decomposition(small64):
    g = torch.Generator().manual_seed(0)
    x, e_edit, e_orig = torch.randn(3, 1, 3, 8, 8, generator=g, dtype=torch.float64)
    for t, t_prev in [(500, 475), (25, 0), (0, None)]:
        ab_t = float(small64.alphas_cumprod[t])
        ab_p = 1.0 if t_prev is None else float(small64.alphas_cumprod[t_prev])
        x_prev, P, D = asymmetric_step(small64, x, t, t_prev, e_edit, e_orig)
        assert torch.allclose(P, (x - math.sqrt(1 - ab_t) * e_edit) / math.sqrt(ab_t),
                              rtol=1e-14, atol=1e-14)
        assert torch.allclose(D, math.sqrt(1 - ab_p) * e_orig, rtol=1e-14, atol=1e-14)
        assert torch.allclose(x_prev, math.sqrt(ab_p) * P + D, rtol=1e-12, atol=1e-12)
        # The direction term never sees the edit.
        _, P2, D2 = asymmetric_step(small64, x, t, t_prev, 2 * e_edit + 1, e_orig)
        assert torch.equal(D2, D) and not torch.allclose(P2, P)
        # No edit: bit-identical to a plain DDIM step.
        same = asymmetric_step(small64, x, t, t_prev, e_orig, e_orig)[0]
        assert torch.equal(same, sampling.ddim_step(x, e_orig, sampling.alpha_bar(small64, t),
                                                      sampling.alpha_bar(small64, t_prev)))


def test_apply_direction_against_hand_computed_steps(small64, oracle, oracle_dirs):
    """Two edited steps (window = the top two grid points), then plain DDIM: recomputed by hand
    with h from the *current* state at each step (no one-step lag) and ε_orig in D_t."""
    d = oracle_dirs["leading"]
    alpha = 2.0
    res = apply_direction(small64, oracle["x0"], d, 1, [alpha], RBEEditConfig(window=(475, 500)))
    assert res.edited_timesteps == [475, 500] and res.window == (475, 500)
    v = d.vectors[1][None]
    x = oracle["xt"]
    assert torch.equal(res.xt, x)
    for t, t_prev in [(500, 475), (475, 450)]:
        enc = small64.encode(x, t)
        e_orig = small64.eps_from_h(x, t, enc.h, encoded=enc)
        e_edit = small64.eps_from_h(x, t, enc.h + alpha * v, encoded=enc)
        ab_t, ab_p = (float(small64.alphas_cumprod[s]) for s in (t, t_prev))
        P = (x - math.sqrt(1 - ab_t) * e_edit) / math.sqrt(ab_t)
        x = math.sqrt(ab_p) * P + math.sqrt(1 - ab_p) * e_orig
    expected = sampling.generate(small64, x, 450, STEPS).last
    assert torch.allclose(res.states, expected, rtol=1e-10, atol=1e-10)
    # "replace" puts ε_edit in both terms: a different (mostly cancelled) result.
    rep = apply_direction(small64, oracle["x0"], d, 1, [alpha],
                          RBEEditConfig(window=(475, 500), mode="replace"))
    plain = res.reconstruction
    assert float((rep.states - res.states).abs().max()) > 1e-3
    assert float((rep.states - plain).abs().max()) < float((res.states - plain).abs().max())


def test_zero_strength_is_plain_ddim_exactly(tiny, tiny_dirs):
    x0, dirs = tiny_dirs
    res = apply_direction(tiny, x0, dirs["rbe"], 2, [0.0, 5.0, -5.0])
    plain = sampling.generate(tiny, sampling.invert(tiny, x0, T, STEPS).last, T, STEPS).last
    assert torch.equal(res.states[0:1], plain)
    assert torch.equal(res.reconstruction, plain.clamp(-1, 1))
    assert not torch.allclose(res.states[1], res.states[2])
    assert res.strengths == [0.0, 5.0, -5.0] and res.images.shape == (3, 3, 16, 16)
    # default window: all steps
    assert res.edited_timesteps == list(sampling.Grid.for_model(tiny, STEPS).up_to(T))
    assert len(res.strip()) == 4 and float(res.images.abs().max()) <= 1


def test_late_stochastic_steps_replay_the_same_noise(tiny, tiny_dirs):
    x0, dirs = tiny_dirs
    cfg = RBEEditConfig(window=(250, T), eta=0.5)
    a = apply_direction(tiny, x0, dirs["rbe"], 0, [0.0, 0.0, 1.0], cfg,
                        generator=torch.Generator().manual_seed(3))
    b = apply_direction(tiny, x0, dirs["rbe"], 0, [0.0], cfg,
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.states[0], a.states[1]) and torch.equal(a.states[:1], b.states)
    assert torch.equal(a.reconstruction, a.images[:1])
    plain = apply_direction(tiny, x0, dirs["rbe"], 0, [0.0], RBEEditConfig(window=(250, T)))
    assert not torch.allclose(plain.states, a.states)  # the noise did something


# ---------------------------------------------------------------------------------- (e) io, rng
def test_save_load_round_trip(tmp_path, oracle_dirs, tiny_dirs):
    for d in (oracle_dirs["leading"], tiny_dirs[1]["global"]):
        folder = tmp_path / d.settings["kind"]
        d.save(folder)
        back = Directions.load(folder)
        for name in ("vectors", "raw_vectors", "singular_values", "unmasked_vectors",
                     "unmasked_values", "mask"):
            a, b = getattr(d, name), getattr(back, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert back.timestep == d.timestep and back.num_steps == d.num_steps
        assert back.settings["project_against"] == d.settings["project_against"]
        assert back.settings["masked_run"]["iterations"] == d.settings["masked_run"][
            "iterations"]
        with pytest.raises(OutputExistsError, match="force"):
            d.save(folder)
        d.save(folder, force=True)
    with pytest.raises(InputError, match="not a directions folder"):
        Directions.load(tmp_path / "missing")


def test_same_generator_same_directions(tiny):
    x0 = _image(tiny, 4)
    xt = sampling.invert(tiny, x0, T, STEPS).last

    def run(gen):
        return directions_at(tiny, xt, T, TINY_MASK, RBEConfig(power_passes=3), generator=gen)

    a, b = run(torch.Generator().manual_seed(5)), run(torch.Generator().manual_seed(5))
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.unmasked_vectors,
                                                             b.unmasked_vectors)
    c = run(None)
    assert torch.equal(c.vectors, run(torch.Generator().manual_seed(0)).vectors)
    assert c.settings["seed"] == 0 and not torch.equal(a.raw_vectors, c.raw_vectors)


def test_state_mask_area_rule_on_a_latent_sized_state():
    """State 2x4x4 for 8x8 images (a latent-like factor 2): each state cell is the mean of its
    2x2 image block."""
    bb = FunctionalBackbone(lambda x, t: x, torch.linspace(0.999, 0.01, 1000, dtype=torch.float64),
                            (2, 4, 4), image_size=(8, 8))
    m = box_mask((1, 1, 4, 6), (8, 8))
    ms = state_mask(bb, m)
    expected = m[0, 0].reshape(4, 2, 4, 2).mean(dim=(1, 3))
    assert ms.shape == (1, 1, 4, 4) and torch.allclose(ms[0, 0], expected)
    assert float(ms[0, 0, 0, 0]) == 0.25  # a corner cell a quarter inside
    assert torch.equal(state_mask(bb, m.numpy()[0, 0] > 0.5), ms)


def test_linear_gaussian_h_space():
    """ε = Q h: ∂(M ⊙ ε)/∂h = diag(M) Q, whose right singular vectors with value 1 span Qᵀ of
    the masked coordinates — a closed form for the whole pipeline on a non-U-Net backbone."""
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g, dtype=torch.float64)
    bb = linear_gaussian(torch.zeros(16), A @ A.T / 16, ac, state_shape=(1, 4, 4))
    m = box_mask((0, 0, 2, 2), (4, 4))
    x = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    d = directions_at(bb, x, 100, m,
                      RBEConfig(k=2, k_unmasked=3, tol=1e-10, project_against="subspace"))
    Q = bb.gaussian["eigenvectors"]
    inside = m.reshape(-1) > 0
    target = Q[inside]  # rows of Q for masked pixels: J_M = diag(M) Q has them as right vectors
    assert torch.allclose(d.singular_values, torch.ones(2, dtype=torch.float64), atol=1e-8)
    span = torch.linalg.qr(target.T).Q
    resid = _flat(d.raw_vectors).T - span @ (span.T @ _flat(d.raw_vectors).T)
    assert float(resid.abs().max()) < 1e-5
    # J_M and J_U act on orthogonal row spaces here: projecting changes nothing.
    assert float((_flat(d.vectors) - _flat(d.raw_vectors)).abs().max()) < 1e-5


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("mask, match", [
    (torch.zeros(16, 16), "empty"),
    (torch.ones(16, 16), "whole image"),
    (torch.ones(8, 8), "mask is 8x8"),
    (torch.full((16, 16), 2.0), "lie in \\[0, 1\\]"),
    (torch.zeros(2, 16, 16), "shape"),
    ([[1.0]], "torch tensor or numpy array"),
    (torch.zeros(16, 16, dtype=torch.long), "floats"),
])
def test_bad_masks(tiny, mask, match):
    with pytest.raises(InputError, match=match):
        discover_directions(tiny, _image(tiny, 0), mask)


@pytest.mark.parametrize("kwargs, match", [
    (dict(t=510), "not on the 40-step"),
    (dict(t=500.0), "t must be an integer"),
    (dict(k=0), "k must be >= 1"),
    (dict(k_unmasked=0), "k_unmasked must be >= 1"),
    (dict(k=3000), "h dimension 2048"),
    (dict(project_against="all"), "project_against must be one of"),
    (dict(tol=0), "tol must be"),
    (dict(tol=float("nan")), "tol must be a finite number > 0"),
    (dict(max_iter=0), "max_iter must be >= 1"),
    (dict(oversample=True), "oversample must be an integer"),
    (dict(power_passes=-1), "power_passes must be >= 0"),
    (dict(chunk=0), "chunk must be >= 1"),
    (dict(generator=1), "generator must be"),
])
def test_bad_discovery_arguments(tiny, kwargs, match):
    generator = kwargs.pop("generator", None)
    with pytest.raises(InputError, match=match):
        discover_directions(tiny, _image(tiny, 0), TINY_MASK, RBEConfig(**kwargs),
                            generator=generator)


def test_discovery_config_must_be_an_rbe_config(tiny):
    with pytest.raises(InputError, match="config must be an RBEConfig, got dict"):
        discover_directions(tiny, _image(tiny, 0), TINY_MASK, {"k": 3})
    with pytest.raises(InputError, match="config must be an RBEConfig, got PowerIterationConfig"):
        global_directions(tiny, _image(tiny, 0), PowerIterationConfig(k=3))
    with pytest.raises(InputError, match="config must be an RBEEditConfig"):
        apply_direction(tiny, _image(tiny, 0), None, 0, [1.0], RBEConfig())


def test_bad_states(tiny):
    x = _image(tiny, 0)
    with pytest.raises(InputError, match="x0 must have shape"):
        discover_directions(tiny, x[..., :8], TINY_MASK)
    with pytest.raises(InputError, match="batch 1"):
        discover_directions(tiny, x.repeat(2, 1, 1, 1), TINY_MASK)
    with pytest.raises(InputError, match="float64"):
        discover_directions(tiny, x.double(), TINY_MASK)
    with pytest.raises(InputError, match="NaN"):
        discover_directions(tiny, torch.full_like(x, float("nan")), TINY_MASK)
    with pytest.raises(InputError, match="torch.Tensor"):
        global_directions(tiny, x.numpy())


def test_backbones_without_h():
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    no_h = FunctionalBackbone(lambda x, t: x, ac, (1, 4, 4))
    with pytest.raises(InputError, match="no bottleneck"):
        discover_directions(no_h, torch.zeros(1, 1, 4, 4), box_mask((0, 0, 2, 2), (4, 4)))
    no_back = FunctionalBackbone(lambda x, t: x, ac, (1, 4, 4), h_fn=lambda x, t: x)
    with pytest.raises(InputError, match="eps_from_h_fn"):
        global_directions(no_back, torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(index=3), "index 3 is out of range"),
    (dict(index=-1), "out of range"),
    (dict(index=True), "index must be an integer"),
    (dict(strengths=[]), "strengths is empty"),
    (dict(strengths=["a"]), "sequence of numbers"),
    (dict(strengths=[float("nan")]), "finite"),
    (dict(t_edit=490), "not on the 40-step"),
    (dict(window=(100, 600)), "window must be"),
    (dict(window=(300, 200)), "window must be"),
    (dict(mode="both"), "mode must be one of"),
    (dict(eta=0.5, window=(200, 500)), "generator"),
    (dict(eta=0.5, generator=torch.Generator()), "there are none"),
    (dict(eta=-1.0), "eta must be"),
])
def test_bad_edit_arguments(tiny, tiny_dirs, kwargs, match):
    x0, dirs = tiny_dirs
    args = dict(index=0, strengths=[1.0], generator=None)
    args.update(kwargs)
    index, strengths, generator = (args.pop(k) for k in ("index", "strengths", "generator"))
    with pytest.raises(InputError, match=match):
        apply_direction(tiny, x0, dirs["rbe"], index, strengths, RBEEditConfig(**args),
                        generator=generator)


def test_directions_from_another_model_are_refused(tiny, small64, oracle_dirs):
    with pytest.raises(InputError, match="h shape"):
        apply_direction(tiny, _image(tiny, 0), oracle_dirs["leading"], 0, [1.0])
    with pytest.raises(InputError, match="Directions object"):
        apply_direction(small64, _image(small64, 0), oracle_dirs["leading"].vectors, 0, [1.0])


def test_rediscover_reproduces_a_direction_that_does_not_move():
    """On the linear Gaussian, ∂(M ⊙ ε)/∂h = diag(M)·Q at every timestep; a soft mask with
    distinct weights gives distinct singular values, so the re-found direction at every step is
    the discovered one and the edit must equal the fixed-direction edit."""
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g, dtype=torch.float64)
    bb = linear_gaussian(torch.zeros(16), A @ A.T / 16, ac, state_shape=(1, 4, 4))
    m = torch.zeros(4, 4, dtype=torch.float64)
    m[0, 0], m[0, 1], m[1, 0], m[1, 1] = 0.9, 0.7, 0.5, 0.3
    x0 = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    d = discover_directions(bb, x0, m, RBEConfig(t=500, k=2, tol=1e-12, max_iter=2000), grid=10)
    fixed = apply_direction(bb, x0, d, 0, [0.5], grid=10)
    moving = apply_direction(bb, x0, d, 0, [0.5], RBEEditConfig(rediscover=True), grid=10)
    align = moving.settings["rediscover_alignment"]
    assert len(align) == len(moving.edited_timesteps) and min(align) > 1 - 1e-8
    assert torch.allclose(moving.states, fixed.states, atol=1e-8)


def test_rediscover_on_a_unet_tracks_and_keeps_zero_strength_exact(tiny, tiny_dirs):
    x0, dirs = tiny_dirs
    res = apply_direction(tiny, x0, dirs["rbe"], 0, [0.0, 0.3],
                          RBEEditConfig(window=(400, T), rediscover=True))
    align = res.settings["rediscover_alignment"]
    assert len(align) == len(res.edited_timesteps) >= 2
    assert all(0.0 <= a <= 1.0 + 1e-6 for a in align)
    plain = sampling.generate(tiny, sampling.invert(tiny, x0, T, STEPS).last, T, STEPS).last
    assert torch.equal(res.states[0:1], plain)
    fixed = apply_direction(tiny, x0, dirs["rbe"], 0, [0.3], RBEEditConfig(window=(400, T)))
    # the re-found directions differ from the discovery one away from t_edit, so must the edit
    assert not torch.allclose(res.states[1], fixed.states[0])


def test_default_t_lands_on_the_models_grid(sd_bb):
    """t=None is the grid point nearest the paper's 500: 501 on the SD config's grid
    (steps_offset=1), where 500 itself is refused; apply defaults to the discovery's t."""
    H, W = sd_bb.image_size
    mask = torch.zeros(H, W, dtype=torch.float64)
    mask[: H // 2, : W // 2] = 1
    cond = sd_bb.condition("")
    x0 = sd_bb.to_state(torch.zeros(1, 3, H, W, dtype=sd_bb.dtype, device=sd_bb.device))
    d = discover_directions(sd_bb, x0, mask, RBEConfig(k=1, max_iter=2), grid=10, cond=cond)
    assert d.timestep == 501 and d.settings["grid"]["timesteps"][0] == 1
    assert apply_direction(sd_bb, x0, d, 0, [1.0], cond=cond).edited_timesteps[-1] == 501
    with pytest.raises(InputError, match=r"t=500 is not on the 10-step leading grid \(offset 1"):
        discover_directions(sd_bb, x0, mask, RBEConfig(t=500, k=1), grid=10, cond=cond)
