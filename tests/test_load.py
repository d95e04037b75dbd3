"""load_backbone: folder layouts, dtypes, and a specific message for every way loading fails."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffgeo.backbones import LatentBackbone, PixelBackbone, load_backbone
from diffgeo.errors import InputError, ModelNotFoundError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _copy(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _to_bin_only(folder):
    """Replace the safetensors weights of ``folder`` by a pickle (.bin) of the same tensors."""
    st = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "diffusion_pytorch_model.bin")
    st.unlink()


def _same_model(a, b):
    """Identical weights, hence ε equal up to kernel choice: weights read through mmap
    (safetensors) and torch.load sit at different alignments, which changes the SIMD path and
    the float32 summation order (measured 9e-7 absolute), so ε is compared to 1e-5 relative."""
    pa, pb = dict(a.unet.named_parameters()), dict(b.unet.named_parameters())
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    x = torch.randn(2, 3, 16, 16, generator=gen(0))
    with torch.no_grad():
        ea, eb = a.eps(x, 123), b.eps(x, 123)
    assert float((ea - eb).norm() / eb.norm()) <= 1e-5


# ------------------------------------------------------------------------------ layouts
def test_pipeline_and_bare_unet_folders_load_the_same_model(pixel_bb, bare_bb):
    assert isinstance(pixel_bb, PixelBackbone) and isinstance(bare_bb, PixelBackbone)
    # Both folders hold the same seeded weights and the same linear schedule.
    assert torch.equal(pixel_bb.alphas_cumprod, bare_bb.alphas_cumprod)
    assert pixel_bb.alphas_cumprod.dtype == torch.float64
    _same_model(pixel_bb, bare_bb)


def test_float64_loading(pixel_bb, pixel_bb64, sd_bb64):
    for bb in (pixel_bb64, sd_bb64):
        assert bb.dtype == torch.float64
        assert all(p.dtype == torch.float64 for p in bb.unet.parameters())
        assert not any(p.requires_grad for p in bb.unet.parameters())  # frozen
        assert not bb.unet.training
    assert all(p.dtype == torch.float64 for p in sd_bb64.vae.parameters())
    assert all(p.dtype == torch.float64 for p in sd_bb64.text_encoder.parameters())
    # The same weights in two precisions: float32 rounding apart (~1e-6 relative).
    x = torch.randn(1, 3, 16, 16, generator=gen(1), dtype=torch.float64)
    with torch.no_grad():
        e64, e32 = pixel_bb64.eps(x, 50), pixel_bb.eps(x.float(), 50)
    assert e64.dtype == torch.float64
    assert float((e64 - e32.double()).norm() / e64.norm()) <= 1e-5


def test_sd_folder_loads_all_parts(sd_bb, sd_v_bb):
    for bb in (sd_bb, sd_v_bb):
        assert isinstance(bb, LatentBackbone)
        assert bb.text_encoder is not None and bb.tokenizer is not None
        assert bb.vae_scale_factor == 2 and not bb.is_sdxl
    assert sd_bb.prediction_type == "epsilon" and sd_v_bb.prediction_type == "v_prediction"


def test_dtype_and_device_are_checked(pixel_path):
    with pytest.raises(InputError, match=r"dtype must be float32, float16, bfloat16 or float64, "
                                         r"got 'float8'"):
        load_backbone(pixel_path, dtype="float8")
    with pytest.raises(InputError, match=r"device 'nonsense' is not available here"):
        load_backbone(pixel_path, device="nonsense")


# ------------------------------------------------------------------------------ failures
def test_pipeline_folder_without_weights(pixel_path, tmp_path):
    folder = _copy(pixel_path, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"has no unet weights \(diffusion_pytorch_model"
                                                 r"\.safetensors or model\.safetensors\)\.$"):
        load_backbone(folder)


def test_bare_folder_without_weights(bare_unet_path, tmp_path):
    folder = _copy(bare_unet_path, tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"has no UNet2DModel weights"):
        load_backbone(folder)


def test_sd_folder_without_vae_weights(sd_path, tmp_path):
    folder = _copy(sd_path, tmp_path)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"has no vae weights"):
        load_backbone(folder)


def test_pickle_only_folder_needs_allow_pickle(pixel_bb, pixel_path, tmp_path):
    folder = _copy(pixel_path, tmp_path)
    _to_bin_only(folder / "unet")
    with pytest.raises(ModelNotFoundError, match=r"It has only pickle weights \(\.bin\): pass "
                                                 r"allow_pickle=True \(CLI: --allow-pickle\)"):
        load_backbone(folder)
    # and the hint is right: with allow_pickle the same model loads
    _same_model(load_backbone(folder, allow_pickle=True), pixel_bb)


def test_unknown_hub_id_offline_names_id_local_path_and_offline_flag():
    repo = "nobody-diffgeo-tests/no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        load_backbone(repo)
    msg = str(info.value)
    assert f"could not load model {repo!r}" in msg
    assert "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" in msg
    assert "pass the path of a local folder saved with save_pretrained" in msg
    assert "--model ./my-model" in msg
    assert "Set HF_HUB_OFFLINE=1" in msg


def test_missing_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"model folder not found: nope"):
        load_backbone("./nope")
    with pytest.raises(ModelNotFoundError, match=r"model folder not found: .*/a/b/c"):
        load_backbone(str(tmp_path / "a" / "b" / "c"))


def test_not_a_model_folder(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(InputError, match=r"model must be a folder, a hub id or 'default'; .* "
                                         r"is a file"):
        load_backbone(tmp_path / "weights.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"is not a model folder: it has neither "
                                                 r"model_index\.json nor config\.json"):
        load_backbone(empty)


def test_bare_folder_problems(bare_unet_path, tmp_path):
    no_sched = _copy(bare_unet_path, tmp_path, "no-sched")
    (no_sched / "scheduler_config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"has a UNet2DModel but no "
                                                 r"scheduler_config\.json"):
        load_backbone(no_sched)
    other = _copy(bare_unet_path, tmp_path, "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"describes a UNet2DConditionModel, expected a "
                                         r"UNet2DModel"):
        load_backbone(other)


def test_unsupported_prediction_type(pixel_path, tmp_path):
    folder = _copy(pixel_path, tmp_path)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "flow"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"prediction_type 'flow' is not supported"):
        load_backbone(folder)
