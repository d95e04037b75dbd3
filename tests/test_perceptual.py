"""The perceptual-based generation curve (App. C.2) on a tiny random ViT and the tiny pixel U-Net.

The ViT is built from a config under a fixed seed, saved with ``save_pretrained`` and read back
through :meth:`DinoFeatures.load`, so the loader is exercised as with a real DINO folder. Its
features mean nothing perceptually; the tests check the plumbing: determinism, batching, the
masking rule, the distance → state → rate chain and the error messages.
"""

from __future__ import annotations

import os

# No test may reach the Hugging Face Hub (huggingface_hub reads this at import).
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffgeo.backbones.base import Backbone, Encoded  # noqa: E402
from diffgeo.errors import InputError, ModelNotFoundError  # noqa: E402
from diffgeo.perceptual import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoFeatures,
    apply_mask,
    cosine_distance,
    mask_box,
    perceptual_curve,
    rate_from_state,
    state_from_distance,
)
from diffgeo.sampling import Grid, GridRule, Trajectory, invert  # noqa: E402


def _write_tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ViTModel(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_path(tmp_path_factory) -> Path:
    return _write_tiny_vit(tmp_path_factory.mktemp("dino") / "tiny-vit")


@pytest.fixture(scope="module")
def dino(vit_path) -> DinoFeatures:
    return DinoFeatures.load(vit_path)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _box_mask(size: int = 16, r: tuple[int, int] = (5, 10), c: tuple[int, int] = (4, 8)
              ) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., r[0]:r[1], c[0]:c[1]] = 1
    return m


# ---------------------------------------------------------------------------------- loading
def test_load_reads_config_and_default_normalisation(dino, vit_path):
    assert dino.image_size == 32
    assert dino.name == str(vit_path)
    assert torch.allclose(dino.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(dino.std.flatten(), torch.tensor(IMAGENET_STD))
    assert not any(p.requires_grad for p in dino.model.parameters())


def test_load_takes_mean_std_from_preprocessor_config(tmp_path):
    folder = _write_tiny_vit(tmp_path / "vit")
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]}))
    d = DinoFeatures.load(folder, image_size=24)
    assert torch.equal(d.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(d.std.flatten(), torch.tensor([0.25, 0.5, 1.0]))
    # Off the native size, ViT interpolates its position embeddings.
    assert d.image_size == 24 and d(_images(2)).shape == (2, 32)


def test_preprocess_resizes_and_normalises(dino):
    black = -torch.ones(2, 3, 16, 16)
    x = dino.preprocess(black)
    assert x.shape == (2, 3, 32, 32)
    expected = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, :, 5, 7], expected.expand(2, 3))


# ---------------------------------------------------------------------------------- features
def test_features_deterministic_and_batch_equals_loop(dino, vit_path):
    imgs = _images(5)
    f = dino(imgs)
    assert f.shape == (5, 32) and f.dtype == torch.float32
    assert torch.equal(f, dino(imgs))
    loop = torch.cat([dino(imgs[i:i + 1]) for i in range(5)])
    assert torch.allclose(f, loop, atol=1e-5)
    chunked = DinoFeatures.load(vit_path, batch_size=2)(imgs)
    assert torch.allclose(f, chunked, atol=1e-5)
    # Different images, different features (the model is not degenerate).
    assert float(cosine_distance(f[0:1], f[1:2])) > 1e-6


def test_multiply_is_the_papers_rule(dino):
    imgs, m = _images(2), _box_mask()
    x = apply_mask(imgs, m)
    assert torch.equal(x[:, :, m[0, 0] == 0], -torch.ones_like(x[:, :, m[0, 0] == 0]))
    assert torch.allclose(x[:, :, m[0, 0] == 1], imgs[:, :, m[0, 0] == 1])
    assert torch.equal(dino.masked(imgs, m), dino(x))


@pytest.mark.parametrize("mode", ["multiply", "crop"])
def test_pixels_outside_the_mask_do_not_matter(dino, mode):
    imgs, m = _images(2), _box_mask()
    other = torch.where(m.bool(), imgs, _images(2, seed=7))
    assert not torch.equal(dino(imgs), dino(other))
    assert torch.equal(dino.masked(imgs, m, mode), dino.masked(other, m, mode))


def test_crop_box_is_square_around_the_mask_and_inside_the_image(dino):
    m = _box_mask()[0, 0]                          # rows 5..9, cols 4..7
    top, left, h, w = mask_box(m, margin=0.1)
    assert h == w == 5 + 2                          # larger side + one pixel each side
    assert top <= 5 and top + h >= 10 and left <= 4 and left + w >= 8
    corner = torch.zeros(16, 16)
    corner[0:3, 13:16] = 1
    top, left, h, w = mask_box(corner, margin=0.5)
    assert (top, left) == (0, 16 - 7) and h == w == 3 + 2 * 2   # ceil(0.5 * 3) each side
    imgs = _images(1)
    assert not torch.allclose(dino.masked(imgs, m, "crop"), dino.masked(imgs, m, "multiply"))


# ---------------------------------------------------------------------------------- curves
class OracleBackbone(Backbone):
    """ε that makes x̂0 equal a fixed image from every state: a perfectly generated path."""

    kind = "oracle"

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__(alphas_cumprod)
        self.x0 = x0

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[1:])

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.x0.shape[-2]), int(self.x0.shape[-1]))

    def encode(self, x, t, cond=None):
        tt = self.timesteps(t, x.shape[0])
        return Encoded(h=x, skips=(), emb=torch.zeros(1), timesteps=tt, x=x)

    def decode(self, enc, h, return_features=False):
        a = self.alphas_cumprod[enc.timesteps].reshape(-1, 1, 1, 1).to(h)
        return (h - a.sqrt() * self.x0) / (1 - a).sqrt()


def _noised_trajectory(alphas: torch.Tensor, x0: torch.Tensor, grid: list[int]) -> Trajectory:
    """States q(X_t | x0) on an arbitrary (non-uniform) grid, from a fixed noise draw."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    states = [x0] + [float(alphas[t]) ** 0.5 * x0 + (1 - float(alphas[t])) ** 0.5 * noise
                     for t in grid]
    return Trajectory([None, *grid], states, "inversion",
                      Grid(tuple(grid), len(grid), GridRule(), alphas))


def test_identical_masked_inputs_give_distance_zero(dino, pixel_bb):
    imgs, m = _images(1), _box_mask()
    f = dino.masked(imgs, m)
    assert abs(float(cosine_distance(f, f))) < 1e-12
    oracle = OracleBackbone(imgs, pixel_bb.alphas_cumprod)
    traj = _noised_trajectory(pixel_bb.alphas_cumprod, imgs, [0, 100, 400, 900])
    for mode in ("multiply", "crop"):
        curve = perceptual_curve(oracle, traj, imgs, m, dino, mode=mode)
        assert float(curve.distance.abs().max()) < 1e-6
        assert torch.equal(curve.state, torch.ones(4, dtype=torch.float64))
        assert float(curve.rate.abs().max()) < 1e-15   # np.gradient's non-uniform rounding


def _independent_rate(state: np.ndarray, t: np.ndarray) -> np.ndarray:
    """-ds/dt: one-sided differences at the ends, the non-uniform 3-point formula inside."""
    d = np.empty_like(state)
    d[0] = (state[1] - state[0]) / (t[1] - t[0])
    d[-1] = (state[-1] - state[-2]) / (t[-1] - t[-2])
    for i in range(1, len(t) - 1):
        hs, hd = t[i] - t[i - 1], t[i + 1] - t[i]
        d[i] = (hs**2 * state[i + 1] + (hd**2 - hs**2) * state[i] - hd**2 * state[i - 1]) \
            / (hs * hd * (hd + hs))
    return -d


def test_curve_along_a_ddim_inversion(dino, pixel_bb):
    image = _images(1, seed=1)
    m = _box_mask()
    traj = invert(pixel_bb, pixel_bb.to_state(image), t=900, grid=10)
    curve = perceptual_curve(pixel_bb, traj, image, m, dino)
    assert curve.timesteps.tolist() == list(range(0, 901, 100))
    d, s = curve.distance.numpy(), curve.state.numpy()
    # x̂0 at t = 0 is the image up to 1% of ε: the clean end is the closest.
    assert int(np.argmin(d)) == 0 and d[0] < 0.1 * d.max()
    assert ((s >= 0) & (s <= 1)).all() and s[int(np.argmax(d))] == 0
    assert np.allclose(s, 1 - d / d.max())
    assert np.allclose(curve.rate.numpy(), _independent_rate(s, curve.timesteps.numpy()))
    assert curve.settings["mode"] == "multiply" and curve.settings["model"] == dino.name


def test_rate_on_a_non_uniform_grid(dino, pixel_bb):
    image = _images(1, seed=2)
    grid = [0, 10, 50, 200, 500, 990]
    traj = _noised_trajectory(pixel_bb.alphas_cumprod, pixel_bb.to_state(image), grid)
    curve = perceptual_curve(pixel_bb, traj, image, _box_mask(), dino, mode="crop")
    t = np.asarray(grid, dtype=np.float64)
    assert np.allclose(curve.rate.numpy(), _independent_rate(curve.state.numpy(), t))
    # np.gradient's interior formula is exact on quadratics, also off a uniform grid.
    q = torch.from_numpy(1 - (t / 1000) ** 2)
    assert np.allclose(rate_from_state(q, grid).numpy()[1:-1], 2 * t[1:-1] / 1000**2)


def test_state_from_distance():
    d = torch.tensor([0.0, 0.2, 0.5, 0.4])
    assert torch.allclose(state_from_distance(d), torch.tensor([1, 0.6, 0, 0.2]).double())
    assert torch.equal(state_from_distance(torch.zeros(3)), torch.ones(3, dtype=torch.float64))
    # Rounding below zero or below atol is no change at all.
    assert torch.equal(state_from_distance(torch.tensor([-1e-9, 1e-9])),
                       torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------- errors
def test_bad_masks_are_refused(dino, pixel_bb):
    imgs = _images(1)
    with pytest.raises(InputError, match="empty"):
        dino.masked(imgs, torch.zeros(16, 16))
    with pytest.raises(InputError, match="16x16"):
        dino.masked(imgs, torch.ones(8, 8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        dino.masked(imgs, torch.full((16, 16), 255.0))
    with pytest.raises(InputError, match="mode"):
        dino.masked(imgs, _box_mask(), mode="blur")
    traj = _noised_trajectory(pixel_bb.alphas_cumprod, imgs, [0, 100])
    with pytest.raises(InputError, match="16x16"):
        perceptual_curve(pixel_bb, traj, imgs, torch.ones(1, 1, 32, 32), dino)


def test_bad_curve_inputs_are_refused(dino, pixel_bb):
    imgs, m = _images(2), _box_mask()
    traj2 = _noised_trajectory(pixel_bb.alphas_cumprod, imgs, [0, 100])
    with pytest.raises(InputError, match="batch size 1"):
        perceptual_curve(pixel_bb, traj2, imgs[:1], m, dino)
    with pytest.raises(InputError, match=r"shape \(1, 3, 16, 16\)"):
        perceptual_curve(pixel_bb, traj2, imgs, m, dino)
    short = _noised_trajectory(pixel_bb.alphas_cumprod, imgs[:1], [0])
    with pytest.raises(InputError, match="at least 2"):
        perceptual_curve(pixel_bb, short, imgs[:1], m, dino)


def test_missing_models_raise_clear_errors(tmp_path, pixel_path):
    with pytest.raises(ModelNotFoundError, match="folder not found"):
        DinoFeatures.load(tmp_path / "no-such-dino")
    with pytest.raises(ModelNotFoundError) as e:
        DinoFeatures.load("nobody-here/no-such-dino-model")
    msg = str(e.value)
    assert "'nobody-here/no-such-dino-model'" in msg and "HF_HUB_OFFLINE" in msg
    assert "local folder" in msg
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        DinoFeatures.load(pixel_path)               # a diffusion pipeline, not a ViT


def test_folders_without_safetensors_or_not_vision_are_refused(tmp_path, vit_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((vit_path / "config.json").read_text())
    with pytest.raises(ModelNotFoundError, match="no safetensors"):
        DinoFeatures.load(bare)
    (bare / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="allow_pickle"):
        DinoFeatures.load(bare)
    from transformers import BertConfig

    text = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=8).save_pretrained(text)
    (text / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="not an RGB vision backbone"):
        DinoFeatures.load(text)
