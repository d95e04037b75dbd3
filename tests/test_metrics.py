"""diffgeo.metrics on tiny CLIP / DINO models built from configs (no weights are downloaded)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import _write_tokenizer  # noqa: E402

from diffgeo import metrics  # noqa: E402
from diffgeo.errors import InputError, ModelNotFoundError  # noqa: E402
from diffgeo.perceptual import DinoFeatures  # noqa: E402


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    tok = _write_tokenizer(folder)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok.get_vocab()), max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    return metrics.ClipModel.load(folder)


@pytest.fixture(scope="module")
def dino(tiny_dino_path):
    return DinoFeatures.load(tiny_dino_path)


def _imgs(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _mask(size=32):
    m = torch.zeros(size, size)
    m[8:20, 10:24] = 1
    return m


def test_clip_load_and_features(clip):
    x = _imgs(2)
    f = clip.image_features(x)
    assert f.shape == (2, 16)
    t = clip.text_features(["a cat", "dog"])
    assert t.shape == (2, 16)
    assert clip.image_size == 32


def test_offline_unknown_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        metrics.ClipModel.load("nobody-here/no-such-clip-model")
    with pytest.raises(ModelNotFoundError, match="not found"):
        metrics.ClipModel.load(str(tmp_path / "missing" / "x"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        metrics.ClipModel.load(tmp_path)


@pytest.mark.parametrize("mode", ["multiply", "crop"])
def test_identical_images(clip, dino, mode):
    x = _imgs(2)
    m = _mask()
    one = torch.ones(2, dtype=torch.float64)
    for mask in (None, m):
        assert torch.allclose(metrics.clip_sim(clip, x, x, mask, mode), one, atol=1e-6)
        assert torch.allclose(metrics.dino_sim(dino, x, x, mask, mode), one, atol=1e-6)
        diff = metrics.clip_diff(clip, x, x, "a cat", mask, mode)
        assert torch.equal(diff, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(metrics.clip_i(clip, x, x), torch.ones(2, dtype=torch.float64), atol=1e-6)
    # CLIP_dir is undefined for a zero image direction: NaN, never a silent 0.
    assert torch.isnan(metrics.clip_dir(clip, x, x, "make it red")).all()
    assert torch.isinf(metrics.psnr(x, x)).all()
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_symmetry(clip, dino):
    a, b = _imgs(2, seed=1), _imgs(2, seed=2)
    m = _mask()
    for f in (lambda p, q: metrics.dino_sim(dino, p, q, m, "crop"),
              lambda p, q: metrics.clip_sim(clip, p, q, m),
              lambda p, q: metrics.clip_i(clip, p, q), metrics.ssim, metrics.psnr):
        assert torch.allclose(f(a, b), f(b, a), atol=1e-7)
    ins, outs = metrics.mse_inside_outside(a, b, m)
    ins2, outs2 = metrics.mse_inside_outside(b, a, m)
    assert torch.allclose(ins, ins2) and torch.allclose(outs, outs2)
    # CLIP_diff is antisymmetric, CLIP_dir flips sign with the direction of the edit.
    assert torch.allclose(metrics.clip_diff(clip, a, b, "cat"),
                          -metrics.clip_diff(clip, b, a, "cat"), atol=1e-7)
    assert torch.allclose(metrics.clip_dir(clip, a, b, "cat"),
                          -metrics.clip_dir(clip, b, a, "cat"), atol=1e-7)


def test_clip_formulas(clip):
    a, b = _imgs(2, seed=3), _imgs(2, seed=4)
    fa, fb = clip.image_features(a).double(), clip.image_features(b).double()
    t = clip.text_features(["cat", "cat"]).double()
    def cos(p, q):
        return torch.nn.functional.cosine_similarity(p, q).cpu()

    assert torch.allclose(metrics.clip_dir(clip, a, b, "cat"), cos(t, fb - fa), atol=1e-7)
    assert torch.allclose(metrics.clip_score(clip, b, "cat"), cos(t, fb), atol=1e-7)
    assert torch.allclose(metrics.clip_diff(clip, a, b, "cat"), cos(t, fb) - cos(t, fa),
                          atol=1e-7)
    tb = clip.text_features(["dog", "dog"]).double()
    assert torch.allclose(metrics.clip_dir(clip, a, b, "cat", before_text="dog"),
                          cos(t - tb, fb - fa), atol=1e-7)
    v = metrics.clip_dir(clip, a, b, "cat")
    assert ((v >= -1) & (v <= 1)).all()


@pytest.mark.parametrize("mode", ["multiply", "crop"])
def test_masks_restrict(clip, dino, mode):
    a, b = _imgs(2, seed=5), _imgs(2, seed=6)
    m = _mask()
    outside = (m == 0)
    b2 = b.clone()
    b2[:, :, outside] = torch.rand_like(b2[:, :, outside]) * 2 - 1
    a2 = a.clone()
    a2[:, :, outside] = -a2[:, :, outside]
    assert torch.allclose(metrics.dino_sim(dino, a, b, m, mode),
                          metrics.dino_sim(dino, a2, b2, m, mode), atol=1e-6)
    assert torch.allclose(metrics.clip_sim(clip, a, b, m, mode),
                          metrics.clip_sim(clip, a2, b2, m, mode), atol=1e-6)
    assert torch.allclose(metrics.clip_diff(clip, a, b, "cat", m, mode),
                          metrics.clip_diff(clip, a2, b2, "cat", m, mode), atol=1e-6)
    assert torch.allclose(metrics.clip_i(clip, b, a, m, mode),
                          metrics.clip_i(clip, b2, a, m, mode), atol=1e-6)
    # ... while without the mask they do change
    assert not torch.allclose(metrics.dino_sim(dino, a, b), metrics.dino_sim(dino, a2, b2),
                              atol=1e-6)
    ins, outs = metrics.mse_inside_outside(a, b, m)
    ins2, outs2 = metrics.mse_inside_outside(a, b2, m)
    assert torch.allclose(ins, ins2) and not torch.allclose(outs, outs2)


def test_batch_equals_loop(clip, dino):
    a, b = _imgs(3, seed=7), _imgs(3, seed=8)
    m = _mask()
    per_masks = torch.stack([_mask(), torch.roll(_mask(), 5, 0), torch.roll(_mask(), -6, 1)])
    texts = ["cat", "a dog", "red"]
    calls = [
        lambda p, q, i: metrics.clip_sim(clip, p, q, m, "crop"),
        lambda p, q, i: metrics.dino_sim(dino, p, q, m),
        lambda p, q, i: metrics.dino_sim(dino, p, q, per_masks if i is None else per_masks[i],
                                         "crop"),
        lambda p, q, i: metrics.clip_diff(clip, p, q, texts if i is None else texts[i]),
        lambda p, q, i: metrics.clip_dir(clip, p, q, texts if i is None else texts[i]),
        lambda p, q, i: metrics.clip_i(clip, p, q, m),
        lambda p, q, i: metrics.ssim(p, q),
        lambda p, q, i: metrics.psnr(p, q),
        lambda p, q, i: metrics.mse_inside_outside(p, q, m)[0],
    ]
    for f in calls:
        batch = f(a, b, None)
        loop = torch.cat([f(a[i:i + 1], b[i:i + 1], i) for i in range(3)])
        assert batch.shape == (3,)
        assert torch.allclose(batch, loop, atol=1e-5), f


def test_ssim_vs_skimage_and_noise():
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 36), indexing="ij")
    base = torch.stack([torch.sin(6 * xx), torch.cos(5 * yy), xx * yy]) * 0.8
    prev = 1.0
    for noise in (0.02, 0.1, 0.4):
        noisy = (base + noise * torch.randn(base.shape, generator=g)).clamp(-1, 1)
        ours = float(metrics.ssim(base, noisy)[0])
        ref = skm.structural_similarity(
            ((base.numpy() + 1) / 2).astype(np.float64), ((noisy.numpy() + 1) / 2),
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
            channel_axis=0)
        assert abs(ours - ref) < 1e-3
        assert ours < prev
        prev = ours


def test_psnr_value():
    a = torch.zeros(1, 3, 8, 8)
    b = a + 0.2
    assert math.isclose(float(metrics.psnr(a, b)[0]), 20.0, rel_tol=1e-6)


def test_bad_inputs(clip):
    with pytest.raises(InputError):
        metrics.ssim(_imgs(1), _imgs(2))
    with pytest.raises(InputError):
        metrics.clip_sim(clip, _imgs(1), _imgs(1), torch.zeros(32, 32))
    with pytest.raises(InputError, match="mode"):
        metrics.clip_sim(clip, _imgs(1), _imgs(1), _mask(), "blur")
    with pytest.raises(InputError):
        metrics.clip_diff(clip, _imgs(2), _imgs(2), ["only one"])


def test_lpips_fid_availability_reported():
    for ok, reason in (metrics.lpips_available(), metrics.fid_available()):
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
        if not ok:
            assert "unavailable" in reason


def test_file_inputs(tmp_path, dino):
    from PIL import Image

    from diffgeo.io import load_image

    paths = []
    for i in range(2):
        arr = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(arr).save(paths[-1])
    mask_path = tmp_path / "mask.png"
    Image.fromarray((_mask().numpy() * 255).astype(np.uint8)).save(mask_path)
    tensors = torch.cat([load_image(p)[0] for p in paths])
    assert torch.allclose(metrics.ssim(paths, paths[::-1]), metrics.ssim(tensors, tensors.flip(0)))
    assert torch.allclose(metrics.dino_sim(dino, paths[0], paths[1], mask_path),
                          metrics.dino_sim(dino, tensors[:1], tensors[1:], _mask()), atol=1e-6)


def test_clip_i_exemplar_other_size_and_soft_mask(clip):
    edited = _imgs(2, seed=9)
    exemplar = _imgs(1, size=48, seed=10)
    soft = _mask() * 0.7
    v = metrics.clip_i(clip, edited, exemplar, soft)
    loop = torch.cat([metrics.clip_i(clip, edited[i:i + 1], exemplar, soft) for i in range(2)])
    assert v.shape == (2,) and torch.allclose(v, loop, atol=1e-6)
    assert ((v >= -1) & (v <= 1)).all()


def test_clip_load_dtype_string(clip, tmp_path):
    clip.model.save_pretrained(tmp_path, safe_serialization=True)
    clip.tokenizer.save_pretrained(tmp_path)
    c64 = metrics.ClipModel.load(tmp_path, dtype="float64")
    assert c64.dtype == torch.float64
    x = _imgs(1)
    assert torch.allclose(metrics.clip_score(c64, x, "cat"), metrics.clip_score(clip, x, "cat"),
                          atol=1e-4)
    with pytest.raises(InputError, match="dtype"):
        metrics.ClipModel.load(tmp_path, dtype="int3")


def test_features_match_clipmodel_forward(clip):
    x = _imgs(2, seed=11)
    tok = clip.tokenizer(["a cat", "dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                         pixel_values=clip.preprocess(x))
    # CLIPModel's forward returns the same embeddings, L2-normalised.
    norm = torch.nn.functional.normalize
    assert torch.allclose(norm(clip.image_features(x)), out.image_embeds, atol=1e-5)
    assert torch.allclose(norm(clip.text_features(["a cat", "dog"])), out.text_embeds, atol=1e-5)


def test_mse_inside_outside_values():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    m = torch.zeros(8, 8)
    m[:4] = 1
    b[0, :, :4] = 0.5  # change only inside
    b[1, :, 4:] = 1.0  # change only outside
    ins, outs = metrics.mse_inside_outside(a, b, m)
    assert torch.allclose(ins, torch.tensor([0.25, 0.0], dtype=torch.float64))
    assert torch.allclose(outs, torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(InputError, match="needs a mask"):
        metrics.mse_inside_outside(a, b, None)


def test_edit_locality_values_and_lpips_note():
    edit_locality = metrics.edit_locality
    before = torch.zeros(1, 3, 4, 4)
    after = before.clone()
    after[..., :2, :] = 1.0   # change inside rows 0-1 only
    after[..., 3, 3] = 0.5
    m = torch.zeros(4, 4)
    m[:2] = 1
    loc = edit_locality(before, after, m)
    assert loc.mse_inside == pytest.approx(1.0)
    assert loc.mse_outside == pytest.approx(0.25 / 8)
    assert loc.ratio == pytest.approx(32.0)
    assert loc.mse == pytest.approx((8 + 0.25) / 16)
    assert loc.lpips is None and loc.note == ""
    same = edit_locality(before, before, m)
    assert same.mse_inside == 0 and math.isnan(same.ratio)
    with_lpips = edit_locality(before[0], after[0], m[None], lpips=True)
    try:
        import lpips  # noqa: F401
    except ImportError:
        assert with_lpips.lpips is None and "not installed" in with_lpips.note
    with pytest.raises(InputError, match="same shape"):
        edit_locality(before, after[..., :3], m)
    with pytest.raises(InputError, match="mask is 3x4"):
        edit_locality(before, after, m[:3])
    with pytest.raises(InputError, match="both inside and outside"):
        edit_locality(before, after, torch.ones(4, 4))
