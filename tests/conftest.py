"""Shared fixtures: tiny diffusion models written to disk and loaded back through load_backbone.

Every model here is built from a fixed seed inside ``torch.random.fork_rng`` (the global RNG of
the test session is left untouched), saved the way real checkpoints are laid out, and read back
with :func:`diffgeo.backbones.load_backbone`, so the loader is exercised by every test that uses
a backbone. Sizes are chosen for speed: a 16x16 pixel U-Net and an 8x8-latent Stable Diffusion,
both with attention blocks and GroupNorm groups of several channels (the code paths of real
checkpoints). All folders and backbones are session-scoped.
"""

from __future__ import annotations

import os

# No test may reach the Hugging Face Hub: huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The models are tiny: one thread avoids oversubscribing the 2-core machine (measured: a 16x16
# U-Net call takes ~4 ms on one thread and ~0.7 s with two threads competing with a training job).
torch.set_num_threads(1)



def pytest_configure(config):
    # torch.func's first jvp imports a torch-internal module that calls the deprecated
    # torch.jit.script; nothing in diffgeo or these tests does.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:`torch.jit.script` is deprecated:DeprecationWarning",
    )


PIXEL_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                       beta_end=0.02)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                    beta_end=0.012)


def _tiny_unet2d():
    from diffgeo.train import build_unet

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_unet("tiny-16")


def _write_pixel_pipeline(folder: Path) -> Path:
    from diffgeo.train import export_model

    return export_model(_tiny_unet2d(), folder)


def _write_bare_unet(folder: Path) -> Path:
    """google/ddpm-* layout: config.json, weights and scheduler_config.json at the root."""
    from diffusers import DDPMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    _tiny_unet2d().save_pretrained(folder, safe_serialization=True)
    DDPMScheduler(**PIXEL_SCHEDULER, prediction_type="epsilon").save_pretrained(folder)
    return folder


def _write_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=16)
    tok.save_pretrained(folder)
    return tok


def _write_sd(folder: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            attention_head_dim=8, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
            latent_channels=4, norm_num_groups=4, sample_size=16,
        )
        text_config = CLIPTextConfig(
            vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        )
        text_encoder = CLIPTextModel(text_config)
    tok = _write_tokenizer(folder / "tokenizer")
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder")
    DDIMScheduler(**SD_SCHEDULER, set_alpha_to_one=False, clip_sample=False,
                  steps_offset=1, prediction_type=prediction_type
                  ).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", type(tok).__name__],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# ---------------------------------------------------------------------------------- folders
@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def pixel_path(models_root) -> Path:
    """A DDPMPipeline folder: model_index.json, unet/, scheduler/."""
    return _write_pixel_pipeline(models_root / "pixel")


@pytest.fixture(scope="session")
def bare_unet_path(models_root) -> Path:
    """A bare UNet2DModel folder with scheduler_config.json beside config.json."""
    return _write_bare_unet(models_root / "bare-unet")


@pytest.fixture(scope="session")
def sd_path(models_root) -> Path:
    return _write_sd(models_root / "sd")


@pytest.fixture(scope="session")
def sd_v_path(models_root, sd_path) -> Path:
    """The same weights as ``sd_path`` with a v-prediction scheduler config."""
    folder = models_root / "sd-v"
    shutil.copytree(sd_path, folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_file.write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------------------------- backbones
@pytest.fixture(scope="session")
def pixel_bb(pixel_path):
    from diffgeo.backbones import load_backbone

    return load_backbone(pixel_path)


@pytest.fixture(scope="session")
def pixel_bb64(pixel_path):
    from diffgeo.backbones import load_backbone

    return load_backbone(pixel_path, dtype="float64")


@pytest.fixture(scope="session")
def bare_bb(bare_unet_path):
    from diffgeo.backbones import load_backbone

    return load_backbone(bare_unet_path)


@pytest.fixture(scope="session")
def sd_bb(sd_path):
    from diffgeo.backbones import load_backbone

    return load_backbone(sd_path)


@pytest.fixture(scope="session")
def sd_bb64(sd_path):
    from diffgeo.backbones import load_backbone

    return load_backbone(sd_path, dtype="float64")


@pytest.fixture(scope="session")
def sd_v_bb(sd_v_path):
    from diffgeo.backbones import load_backbone

    return load_backbone(sd_v_path)


# ------------------------------------------------------------------ CLI test inputs (shared)
@pytest.fixture(scope="session")
def cli():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """An untrained tiny-16 pixel model folder (seeded: every run sees the same weights)."""
    from diffgeo.train import build_unet, export_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = build_unet("tiny-16")
    return export_model(unet, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_dino_path(tmp_path_factory) -> Path:
    """A seeded 2-layer ViT (32x32 input, 8x8 patches) saved as safetensors: DINO stand-in."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("dino")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64), add_pooling_layer=False)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Path:
    """A 20x30 (HxW) RGB PNG: not the model's size, so --fit is needed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------ CLI error checks (shared)
def _error_lines(result) -> list[str]:
    import re

    return [ln for ln in re.split(r"[\r\n]+", result.stderr) if ln.startswith("error:")]


def _assert_user_error(result, *fragments: str) -> str:
    """Exit 2, exactly one 'error:' line containing every fragment, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception
    assert "Traceback" not in result.output
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------- test files
def save_rgb(path: Path, h: int = 20, w: int = 24, seed: int = 0) -> Path:
    """A seeded random RGB PNG (what a user's photo is to a script)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def save_box_mask(path: Path, h: int = 20, w: int = 24, box=(5, 6, 12, 14)) -> Path:
    """A white box (r0, c0, r1, c1, end exclusive) on black, as a PNG mask."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    m[box[0]:box[2], box[1]:box[3]] = 255
    Image.fromarray(m).save(path)
    return path
