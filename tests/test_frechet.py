"""Fréchet distance (closed forms, scipy cross-check), FD_DINO on a tiny DINO built from a config,
LPIPS / FID when unavailable (and their plumbing with stand-in networks), and the set rows and
notes of ``diffgeo evaluate``. Nothing is downloaded."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffgeo import metrics  # noqa: E402
from diffgeo.errors import InputError  # noqa: E402
from diffgeo.evaluate import SET_METRICS, Table, evaluate_results, format_table  # noqa: E402
from diffgeo.perceptual import DinoFeatures  # noqa: E402

F64 = torch.float64


# ---------------------------------------------------------------------------------- helpers
def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=_rng(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _exact_set(mu: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean is exactly mu and unbiased sample covariance exactly cov."""
    d = mu.shape[0]
    z = torch.randn(n, d, generator=_rng(seed), dtype=F64)
    z = z - z.mean(0)
    white = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T
    return mu + white @ torch.linalg.cholesky(cov).T


def _random_cov(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=_rng(seed), dtype=F64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)


def _imgs(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=_rng(seed)) * 2 - 1


@pytest.fixture(scope="module")
def dino_folder(tiny_dino_path) -> Path:
    return tiny_dino_path


@pytest.fixture(scope="module")
def dino(dino_folder) -> DinoFeatures:
    return DinoFeatures.load(dino_folder)


# ---------------------------------------------------------------------------------- closed forms
def test_stats_match_numpy():
    x = torch.randn(40, 5, generator=_rng(0), dtype=F64) * 3 + 1
    mu, sigma = metrics.frechet_stats(x)
    assert mu.dtype == sigma.dtype == F64 and sigma.shape == (5, 5)
    assert np.allclose(mu.numpy(), x.numpy().mean(0))
    assert np.allclose(sigma.numpy(), np.cov(x.numpy(), rowvar=False))  # ddof = 1
    assert torch.equal(sigma, sigma.T)
    # numpy and float32 inputs are accepted and computed in float64
    mu2, sigma2 = metrics.frechet_stats(x.numpy().astype(np.float32))
    assert mu2.dtype == F64 and torch.allclose(sigma2, sigma, atol=1e-5)


def test_identical_sets_give_zero():
    for n, d, scale in ((50, 4, 1.0), (200, 16, 1e3), (5, 20, 1.0)):  # last: rank-deficient
        x = torch.randn(n, d, generator=_rng(n), dtype=F64) * scale
        fd = metrics.frechet_distance(x, x)
        assert 0 <= fd <= 1e-9 * float(x.var(0).sum())
    x = torch.randn(30, 8, generator=_rng(1))  # float32
    assert metrics.frechet_distance(x, x.clone()) < 1e-9


def test_diagonal_covariances_closed_form():
    a = torch.tensor([1.0, 4.0, 9.0, 0.25], dtype=F64)
    b = torch.tensor([4.0, 1.0, 0.25, 2.0], dtype=F64)
    mu_a = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=F64)
    mu_b = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    expected = float(((mu_a - mu_b) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = metrics.frechet_distance_from_stats(mu_a, torch.diag(a), mu_b, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)
    xa = _exact_set(mu_a, torch.diag(a), 60, seed=2)
    xb = _exact_set(mu_b, torch.diag(b), 45, seed=3)  # the sets' sizes may differ
    assert metrics.frechet_distance(xa, xb) == pytest.approx(expected, rel=1e-9)


def test_commuting_covariances_closed_form():
    q = _orthogonal(5, seed=4)
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1], dtype=F64)
    mu = torch.zeros(5, dtype=F64)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0], dtype=F64)
    # b singular (one zero variance): the square root of a rounding-level eigenvalue costs
    # about sqrt(machine eps) of accuracy, hence the looser tolerance
    for b, rel in (([2.0, 0.3, 2.0, 1.0, 0.7], 1e-10), ([2.0, 0.3, 2.0, 1.0, 0.0], 1e-7)):
        b = torch.tensor(b, dtype=F64)
        sa, sb = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
        expected = float(((a.sqrt() - b.sqrt()) ** 2).sum() + (shift ** 2).sum())
        got = metrics.frechet_distance_from_stats(mu, sa, mu + shift, sb)
        assert got == pytest.approx(expected, rel=rel)
        xa = _exact_set(mu, sa, 40, seed=5) if b.min() > 0 else None
        if xa is not None:
            xb = _exact_set(mu + shift, sb, 30, seed=6)
            assert metrics.frechet_distance(xa, xb) == pytest.approx(expected, rel=1e-8)


def test_one_dimension():
    # N(m1, s1²) vs N(m2, s2²): (m1 - m2)² + (s1 - s2)²
    xa = _exact_set(torch.tensor([1.5], dtype=F64), torch.tensor([[4.0]], dtype=F64), 10, 5)
    xb = _exact_set(torch.tensor([-0.5], dtype=F64), torch.tensor([[0.25]], dtype=F64), 7, 6)
    assert metrics.frechet_distance(xa, xb) == pytest.approx(4.0 + 1.5**2, rel=1e-10)


def test_shifted_copy_gives_squared_shift():
    x = torch.randn(80, 6, generator=_rng(7), dtype=F64) @ torch.randn(6, 6, generator=_rng(8),
                                                                        dtype=F64)
    s = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, -0.25], dtype=F64)
    assert metrics.frechet_distance(x, x + s) == pytest.approx(float(s @ s), rel=1e-9)


def test_symmetry_and_invariance():
    xa = torch.randn(70, 7, generator=_rng(9), dtype=F64) @ torch.randn(7, 7, generator=_rng(10),
                                                                         dtype=F64)
    xb = torch.randn(50, 7, generator=_rng(11), dtype=F64) * 2 + 1
    fd = metrics.frechet_distance(xa, xb)
    assert fd > 0
    assert metrics.frechet_distance(xb, xa) == pytest.approx(fd, rel=1e-9)
    # a common rotation and translation of both sets leaves the distance unchanged
    q, t = _orthogonal(7, seed=12), torch.randn(7, generator=_rng(13), dtype=F64)
    assert metrics.frechet_distance(xa @ q + t, xb @ q + t) == pytest.approx(fd, rel=1e-9)


def test_non_commuting_against_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    d = 12
    sa, sb = _random_cov(d, 14), _random_cov(d, 15)
    assert not torch.allclose(sa @ sb, sb @ sa)
    mu_a = torch.randn(d, generator=_rng(16), dtype=F64)
    mu_b = torch.randn(d, generator=_rng(17), dtype=F64)
    covmean = linalg.sqrtm(sa.numpy() @ sb.numpy())
    covmean = np.real(covmean)
    ref = float(((mu_a - mu_b) ** 2).sum()) + float(np.trace(sa.numpy() + sb.numpy()
                                                             - 2 * covmean))
    assert metrics.frechet_distance_from_stats(mu_a, sa, mu_b, sb) == pytest.approx(ref,
                                                                                   rel=1e-9)
    # and from samples, against numpy's statistics
    xa = torch.randn(90, d, generator=_rng(18), dtype=F64) @ torch.linalg.cholesky(sa).T + mu_a
    xb = torch.randn(60, d, generator=_rng(19), dtype=F64) @ torch.linalg.cholesky(sb).T + mu_b
    na, nb = xa.numpy(), xb.numpy()
    ca, cb = np.cov(na, rowvar=False), np.cov(nb, rowvar=False)
    ref = (float(((na.mean(0) - nb.mean(0)) ** 2).sum())
           + float(np.trace(ca + cb - 2 * np.real(linalg.sqrtm(ca @ cb)))))
    assert metrics.frechet_distance(xa, xb) == pytest.approx(ref, rel=1e-8)


def test_rank_deficient_sets_are_finite():
    xa = torch.randn(4, 30, generator=_rng(20), dtype=F64)
    xb = torch.randn(6, 30, generator=_rng(21), dtype=F64) + 0.3
    fd = metrics.frechet_distance(xa, xb)
    assert math.isfinite(fd) and fd > 0
    assert metrics.frechet_distance(xb, xa) == pytest.approx(fd, rel=1e-8)


def test_bad_inputs():
    good = torch.randn(5, 3)
    cases = [
        (torch.randn(5), good, "shape \\(N, D\\)"),
        (torch.randn(2, 5, 3), good, "shape \\(N, D\\)"),
        (torch.randn(1, 3), good, "at least 2"),
        (good, torch.randn(5, 4), "same feature size"),
        (torch.full((5, 3), math.nan), good, "NaN"),
        ("features", good, "tensor or array"),
        (torch.zeros(5, 0), torch.zeros(5, 0), "no feature dimensions"),
    ]
    for a, b, match in cases:
        with pytest.raises(InputError, match=match):
            metrics.frechet_distance(a, b)
    mu, sigma = metrics.frechet_stats(good)
    with pytest.raises(InputError, match="covariance must be"):
        metrics.frechet_distance_from_stats(mu, sigma[:2, :2], mu, sigma)
    with pytest.raises(InputError, match="different feature sizes"):
        metrics.frechet_distance_from_stats(mu, sigma, mu[:2], sigma[:2, :2])
    with pytest.raises(InputError, match="vector"):
        metrics.frechet_distance_from_stats(sigma, sigma, mu, sigma)
    with pytest.raises(InputError, match="NaN"):
        metrics.frechet_distance_from_stats(mu * math.inf, sigma, mu, sigma)


def test_cached_stats_give_the_same_distance():
    xa = torch.randn(30, 4, generator=_rng(22), dtype=F64)
    xb = torch.randn(25, 4, generator=_rng(23), dtype=F64) + 1
    ref = metrics.frechet_stats(xa)
    assert metrics.frechet_distance_from_stats(*ref, *metrics.frechet_stats(xb)) == \
        metrics.frechet_distance(xa, xb)


# ---------------------------------------------------------------------------------- FD_DINO
def test_fd_dino_identical_and_different(dino):
    a, b = _imgs(5, seed=1), _imgs(6, seed=2)
    assert metrics.fd_dino(dino, a, a.clone()) < 1e-9
    fd = metrics.fd_dino(dino, a, b)
    assert fd > 1e-6
    ref = metrics.frechet_distance(dino(a), dino(b))
    assert fd == pytest.approx(ref, rel=1e-9)
    assert metrics.fd_dino(dino, b, a) == pytest.approx(fd, rel=1e-6)
    # a set and a slightly noisier copy are closer than two unrelated sets
    near = (a + 0.05 * torch.randn(a.shape, generator=_rng(3))).clamp(-1, 1)
    assert metrics.fd_dino(dino, a, near) < fd


def test_fd_dino_files_of_mixed_sizes(dino, tmp_path):
    from diffgeo.io import load_image

    paths = []
    for i, size in enumerate((32, 32, 40, 24, 32)):
        arr = (np.random.default_rng(i).random((size, size, 3)) * 255).astype(np.uint8)
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(arr).save(paths[-1])
    feats = torch.cat([dino(load_image(p)[0]) for p in paths])
    other = _imgs(4, seed=4)
    assert metrics.fd_dino(dino, paths, other) == pytest.approx(
        metrics.frechet_distance(feats, dino(other)), rel=1e-6)
    assert metrics.fd_dino(dino, paths, paths) < 1e-9
    # a list of tensors of different sizes works too
    mixed = [_imgs(2, 32, seed=5), _imgs(1, 48, seed=6)[0]]
    assert math.isfinite(metrics.fd_dino(dino, mixed, other))


def test_fd_dino_bad_sets(dino):
    with pytest.raises(InputError, match="at least 2"):
        metrics.fd_dino(dino, _imgs(1), _imgs(3))
    with pytest.raises(InputError, match="non-empty list"):
        metrics.fd_dino(dino, [], _imgs(3))
    with pytest.raises(InputError, match=r"images_b\[1\]"):
        metrics.fd_dino(dino, _imgs(3), [_imgs(1), 3])


# ---------------------------------------------------------------------------------- LPIPS / FID
def test_lpips_and_fid_unavailable_raise_the_reason():
    ok, reason = metrics.fid_available()
    if ok:
        pytest.skip("FID is available here")
    with pytest.raises(InputError, match=re.escape(reason)):
        metrics.fid(_imgs(3), _imgs(3, seed=1))
    with pytest.raises(InputError, match=re.escape(reason)):
        metrics.inception_features(_imgs(2))
    ok, reason = metrics.lpips_available()
    if ok:
        pytest.skip("LPIPS is available here")
    with pytest.raises(InputError, match=re.escape(reason)):
        metrics.lpips_distance(_imgs(2), _imgs(2, seed=1))


class _FakeLpips(torch.nn.Module):
    """Stands in for lpips.LPIPS: (B, 1, 1, 1) mean squared difference."""

    def forward(self, x, y):
        return ((x - y) ** 2).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)


class _FakeInception(torch.nn.Module):
    """Stands in for pytorch_fid's InceptionV3: [features (B, 6, 1, 1)] of [0, 1] images."""

    def forward(self, x):
        assert float(x.min()) >= 0 and float(x.max()) <= 1
        f = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)
        return [f[..., None, None]]


def _fake_features(x: torch.Tensor) -> torch.Tensor:
    return _FakeInception()((x + 1) / 2)[0].flatten(1).double()


@pytest.fixture
def fake_lpips_fid(monkeypatch):
    monkeypatch.setattr(metrics, "lpips_available", lambda: (True, "fake LPIPS"))
    monkeypatch.setattr(metrics, "fid_available", lambda: (True, "fake FID"))
    monkeypatch.setattr(metrics, "_lpips_model", lambda device: _FakeLpips())
    monkeypatch.setattr(metrics, "_inception_model", lambda device: _FakeInception())


def test_lpips_and_fid_plumbing_with_stand_ins(fake_lpips_fid):
    a, b = _imgs(5, seed=7), _imgs(4, seed=8)
    assert metrics.fid(a, b) == pytest.approx(
        metrics.frechet_distance(_fake_features(a), _fake_features(b)), rel=1e-6)
    assert metrics.fid(a, a) < 1e-9
    x, y = _imgs(3, seed=9), _imgs(3, seed=10)
    d = metrics.lpips_distance(x, y, batch_size=2)
    assert d.dtype == F64 and d.shape == (3,)
    assert torch.allclose(d, ((x - y) ** 2).mean(dim=(1, 2, 3)).double(), atol=1e-7)
    assert torch.equal(metrics.lpips_distance(x, x), torch.zeros(3, dtype=F64))
    with pytest.raises(InputError, match="same shape"):
        metrics.lpips_distance(_imgs(2), _imgs(3))


# ---------------------------------------------------------------------------------- evaluate
def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _fake_results(out: Path, n: int) -> None:
    """n finished invert jobs: input.png / reconstruction.png pairs of random 32x32 images."""
    from diffgeo.batch import MARKER, spec_hash
    from diffgeo.io import atomic_write

    rng = np.random.default_rng(0)
    for i in range(n):
        d = out / f"job{i}"
        a = rng.integers(0, 256, (32, 32, 3))
        b = np.clip(a + rng.integers(-60, 61, (32, 32, 3)), 0, 255)
        _write(d / "input.png", a)
        _write(d / "reconstruction.png", b)
        spec = {"task": "invert", "id": f"job{i}", "image": "x.png"}
        atomic_write(d / MARKER, json.dumps({"hash": spec_hash(spec), "spec": spec}))


def _pairs(out: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffgeo.io import load_image

    before = torch.cat([load_image(out / f"job{i}" / "input.png")[0] for i in range(n)])
    after = torch.cat([load_image(out / f"job{i}" / "reconstruction.png")[0] for i in range(n)])
    return before, after


def test_evaluate_fd_dino_row_and_notes(tmp_path, dino, dino_folder):
    out = tmp_path / "res"
    _fake_results(out, 3)
    table = evaluate_results(out, ["psnr", "mse"], dino=str(dino_folder))
    assert isinstance(table, Table)
    rows = {(r["task"], r["metric"]): r for r in table}
    before, after = _pairs(out, 3)
    fd = rows[("invert", "fd_dino")]
    assert fd["n"] == 3 and math.isnan(fd["std"]) and fd["non_finite"] == 0
    assert fd["mean"] == pytest.approx(metrics.fd_dino(dino, before, after), rel=1e-6)
    assert fd["mean"] > 0
    # the per-pair DINO_sim is unchanged (same numbers as metrics.dino_sim)
    ds = rows[("invert", "dino_sim")]
    ref = metrics.dino_sim(dino, before, after)
    assert ds["n"] == 3 and ds["mean"] == pytest.approx(float(ref.mean()), rel=1e-6)
    assert rows[("invert", "psnr")]["n"] == 3
    # LPIPS / FID are not available here: no rows, one note each, saying why
    expected_notes = [reason for ok, reason in (metrics.lpips_available(),
                                                metrics.fid_available()) if not ok]
    assert table.notes == expected_notes
    if expected_notes:
        assert not any(r["metric"] in ("lpips", "fid") for r in table)
    text = format_table(table)
    assert "fd_dino" in text and "set metric" in text and "N=3" in text
    for note in expected_notes:
        assert f"note: {note}" in text
    data = json.loads((out / "evaluation.json").read_text())
    assert data["notes"] == expected_notes
    assert data["sets"]["invert/fd_dino"]["jobs"] == ["job0", "job1", "job2"]
    assert data["sets"]["invert/fd_dino"]["value"] == pytest.approx(fd["mean"])
    row = next(r for r in data["table"] if r["metric"] == "fd_dino")
    assert row["std"] == "nan" and row["n"] == 3
    csv = (out / "evaluation.csv").read_text().splitlines()
    assert csv[0] == "task,metric,mean,std,n,non_finite"
    assert any(line.startswith("invert,fd_dino,") and line.endswith(",nan,3,0") for line in csv)
    assert "fd_dino" in SET_METRICS and "fid" in SET_METRICS


def test_evaluate_set_metric_needs_two_pairs(tmp_path, dino_folder):
    out = tmp_path / "res"
    _fake_results(out, 1)
    table = evaluate_results(out, ["mse"], dino=str(dino_folder), lpips=False, fid=False)
    assert not any(r["metric"] == "fd_dino" for r in table)
    assert any(r["metric"] == "dino_sim" for r in table)
    assert len(table.notes) == 1 and "fd_dino not computed for invert" in table.notes[0]
    assert "at least 2 pairs" in format_table(table)


def test_evaluate_without_lpips_fid_has_no_notes(tmp_path):
    out = tmp_path / "res"
    _fake_results(out, 2)
    table = evaluate_results(out, ["mse"], lpips=False, fid=False)
    assert table.notes == [] and "note:" not in format_table(table)
    assert [r["metric"] for r in table] == ["mse"]
    # an empty folder: a table with no rows, said in words
    empty = tmp_path / "empty"
    empty.mkdir()
    t = evaluate_results(empty, write=False)
    assert format_table(t).startswith("no finished jobs")


def test_evaluate_lpips_and_fid_rows_with_stand_ins(tmp_path, fake_lpips_fid):
    out = tmp_path / "res"
    _fake_results(out, 3)
    table = evaluate_results(out, ["psnr"])
    assert table.notes == []
    rows = {(r["task"], r["metric"]): r for r in table}
    before, after = _pairs(out, 3)
    lp = rows[("invert", "lpips")]
    per = ((after.double() - before.double()) ** 2).mean(dim=(1, 2, 3))
    assert lp["n"] == 3 and lp["mean"] == pytest.approx(float(per.mean()), rel=1e-5)
    f = rows[("invert", "fid")]
    assert f["n"] == 3 and math.isnan(f["std"])
    assert f["mean"] == pytest.approx(metrics.frechet_distance(
        _fake_features(before.float()), _fake_features(after.float())), rel=1e-5)
    data = json.loads((out / "evaluation.json").read_text())
    assert set(data["values"]["invert/lpips"]) == {"job0", "job1", "job2"}
    assert "invert/fid" in data["sets"]


def test_cli_evaluate_prints_set_rows_and_notes(tmp_path, dino_folder, cli):
    from diffgeo.cli import app

    out = tmp_path / "res"
    _fake_results(out, 2)
    res = cli.invoke(app, ["evaluate", str(out), "--metric", "mse", "--dino", str(dino_folder)])
    assert res.exit_code == 0, res.output
    assert "fd_dino" in res.output and "N=2" in res.output
    missing = [reason for ok, reason in (metrics.lpips_available(), metrics.fid_available())
               if not ok]
    for reason in missing:
        assert f"note: {reason}" in res.output
    res = cli.invoke(app, ["evaluate", str(out), "--metric", "mse", "--no-lpips", "--no-fid",
                           "--force"])
    assert res.exit_code == 0, res.output
    assert "note:" not in res.output and "fd_dino" not in res.output
