"""Tests for diffgeo.train: runs, checkpoints, exact resume, export, inputs, schedules."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import csv
import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffgeo.backbones import load_backbone
from diffgeo.errors import InputError
from diffgeo.train import (
    TrainConfig,
    build_unet,
    ddpm_scheduler,
    export_checkpoint,
    load_training_images,
    loss_weights,
    lr_at,
    train,
)

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _tiny(out: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny-16", data="scenes", num_scenes=64, steps=4, batch_size=4,
                checkpoint_every=2, warmup_steps=2, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg: TrainConfig, init_seed: int | None = 0, on_step=None) -> Path:
    """train() with the global torch RNG fixed and restored afterwards: the tests below check that
    the initialisation depends on cfg.seed only, whatever the global RNG holds."""
    with torch.random.fork_rng():
        if init_seed is not None:
            torch.manual_seed(init_seed)
        return train(cfg, progress=False, on_step=on_step)


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _log_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@dataclass
class Run:
    out: Path
    first: Path  # a copy of the run folder as the first call left it
    model: Path
    steps_first: list[int]
    steps_resumed: list[int]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """10 steps (log row every 10 steps, checkpoint every 5), then resumed up to 20."""
    root = tmp_path_factory.mktemp("train")
    out = root / "run"
    cfg = _tiny(out, steps=10, checkpoint_every=5)
    first: list[int] = []
    _train(cfg, on_step=lambda s, loss: first.append(s))
    shutil.copytree(out, root / "after-first")
    resumed: list[int] = []
    # A different init seed: if the resumed run rebuilt the U-Net instead of loading the
    # checkpoint, its weights would not continue the first run (checked by the exact test).
    model = _train(replace(cfg, steps=20), init_seed=99,
                   on_step=lambda s, loss: resumed.append(s))
    return Run(out=out, first=root / "after-first", model=model, steps_first=first,
               steps_resumed=resumed)


# ------------------------------------------------------------------------------ a run


def test_first_run_writes_checkpoint_model_and_log(run):
    d = run.first
    assert run.steps_first == list(range(1, 11))
    state = json.loads((d / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10
    assert state["config"]["preset"] == "tiny-16"
    for f in (WEIGHTS, "unet/config.json", "ema.safetensors", "optimizer.pt"):
        assert (d / "checkpoint" / f).is_file(), f
    # The atomic swap leaves no temporary folders behind.
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint", "model", "train_log.csv"]

    m = d / "model"
    index = json.loads((m / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert (m / WEIGHTS).is_file()
    assert (m / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((m / "training.json").read_text())["total_steps"] == 10

    rows = _log_rows(d / "train_log.csv")
    assert rows[0] == ["step", "loss", "lr", "seconds"]
    assert [r[0] for r in rows[1:]] == ["10"]
    assert math.isfinite(float(rows[1][1]))


def test_resume_continues_from_the_checkpoint(run):
    # Only steps 11..20 ran: the second call did not start from scratch.
    assert run.steps_resumed == list(range(11, 21))
    assert json.loads((run.out / "checkpoint" / "state.json").read_text())["step"] == 20
    assert json.loads((run.model / "training.json").read_text())["total_steps"] == 20
    rows = _log_rows(run.out / "train_log.csv")
    assert rows[0] == ["step", "loss", "lr", "seconds"]
    assert [r[0] for r in rows[1:]] == ["10", "20"]  # appended, one header
    assert rows[1] == _log_rows(run.first / "train_log.csv")[1]
    # Training moved the weights.
    before = load_file(str(run.first / "checkpoint" / WEIGHTS))
    after = load_file(str(run.out / "checkpoint" / WEIGHTS))
    assert not _weights_equal(before, after)


def test_exported_model_is_the_ema_of_the_last_checkpoint(run):
    exported = load_file(str(run.model / WEIGHTS))
    ema = load_file(str(run.out / "checkpoint" / "ema.safetensors"))
    raw = load_file(str(run.out / "checkpoint" / WEIGHTS))
    assert _weights_equal(exported, ema)
    assert not _weights_equal(exported, raw)


class _Stop(Exception):
    pass


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    # Interrupted after step 5 (checkpoint at 4, on_step runs before the save), then resumed:
    # the weights, EMA and export must equal an uninterrupted run bit for bit, which holds only
    # if the U-Net, optimiser state, EMA and data RNG were all restored from the checkpoint.
    full = _train(_tiny(tmp_path / "full", steps=6))

    def stop(step: int, loss: float) -> None:
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        _train(_tiny(tmp_path / "cut", steps=6), on_step=stop)
    assert json.loads((tmp_path / "cut/checkpoint/state.json").read_text())["step"] == 4
    seen: list[int] = []
    cut = _train(_tiny(tmp_path / "cut", steps=6), init_seed=7,
                 on_step=lambda s, loss: seen.append(s))
    assert seen == [5, 6]
    for name in ("checkpoint/" + WEIGHTS, "checkpoint/ema.safetensors"):
        assert _weights_equal(load_file(str(tmp_path / "full" / name)),
                              load_file(str(tmp_path / "cut" / name))), name
    assert _weights_equal(load_file(str(full / WEIGHTS)), load_file(str(cut / WEIGHTS)))


def test_load_backbone_reads_the_exported_model(run):
    bb = load_backbone(run.model)
    s = bb.summary()
    assert s.kind == "pixel"
    assert s.image_size == (16, 16)
    assert s.state_shape == (3, 16, 16)
    assert s.num_train_timesteps == 1000
    assert s.prediction_type == "epsilon"
    assert s.parameters == sum(p.numel() for p in build_unet("tiny-16").parameters())
    # Linear betas 1e-4..0.02 (float64 reference).
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    np.testing.assert_allclose(bb.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    with torch.no_grad():
        eps = bb.eps(torch.zeros(1, 3, 16, 16), 500)
    assert eps.shape == (1, 3, 16, 16) and torch.isfinite(eps).all()


def test_export_checkpoint_produces_a_loadable_model(run, tmp_path):
    out = export_checkpoint(run.out / "checkpoint", tmp_path / "exported")
    assert _weights_equal(load_file(str(out / WEIGHTS)), load_file(str(run.model / WEIGHTS)))
    assert json.loads((out / "training.json").read_text())["total_steps"] == 20
    # The shipped config must not record the checkpoint's local path.
    assert "_name_or_path" not in json.loads((out / "unet" / "config.json").read_text())
    assert load_backbone(out).summary().image_size == (16, 16)
    with pytest.raises(InputError, match="not a training checkpoint"):
        export_checkpoint(run.model, tmp_path / "x")


def test_resume_from_a_model_folder(run, tmp_path):
    seen: list[int] = []
    model = _train(_tiny(tmp_path / "more", steps=22, resume=str(run.model)),
                   on_step=lambda s, loss: seen.append(s))
    # training.json says 20 steps were done: the run continues at 21.
    assert seen == [21, 22]
    assert json.loads((model / "training.json").read_text())["total_steps"] == 22
    src, new = load_file(str(run.model / WEIGHTS)), load_file(str(model / WEIGHTS))
    assert src.keys() == new.keys() and not _weights_equal(src, new)
    # Nothing left to do: the export is the source model unchanged.
    same = _train(_tiny(tmp_path / "same", steps=20, resume=str(run.model)))
    assert _weights_equal(src, load_file(str(same / WEIGHTS)))


def test_train_on_a_folder_of_images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    arrays = []
    for i in range(8):
        arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        arrays.append(arr)
        Image.fromarray(arr).save(folder / ("nested" if i % 2 else ".") / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    cfg = _tiny(tmp_path / "run", data=str(folder), steps=2, batch_size=2)
    data = load_training_images(cfg)
    assert data.dtype == torch.uint8 and tuple(data.shape) == (8, 3, 16, 16)
    # Same size as the model: loaded exactly (files sorted by path).
    files = sorted(p for p in folder.rglob("*.png"))
    by_name = {f"im{i}.png": a for i, a in enumerate(arrays)}
    for k, f in enumerate(files):
        assert np.array_equal(data[k].permute(1, 2, 0).numpy(), by_name[f.name])
    model = _train(cfg)
    assert load_backbone(model).summary().image_size == (16, 16)


# ------------------------------------------------------------------------------ bad inputs


def test_bad_preset(tmp_path):
    with pytest.raises(InputError, match="preset must be one of") as e:
        _train(_tiny(tmp_path / "r", preset="nope"))
    assert "tiny-16" in str(e.value) and "'nope'" in str(e.value)


def test_missing_data_folder(tmp_path):
    with pytest.raises(InputError, match="data must be 'scenes' or an existing folder"):
        _train(_tiny(tmp_path / "r", data="/does/not/exist"))
    assert not (tmp_path / "r").exists()  # no half-made run folder


def test_data_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no images"):
        _train(_tiny(tmp_path / "r", data=str(tmp_path / "empty")))


def test_resume_from_a_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 8)
    with pytest.raises(InputError, match="neither a checkpoint nor a model folder"):
        _train(_tiny(tmp_path / "r", resume=str(f)))


@pytest.mark.parametrize("field", ["steps", "batch_size"])
def test_zero_steps_or_batch(tmp_path, field):
    with pytest.raises(InputError, match="must be >= 1"):
        _train(_tiny(tmp_path / "r", **{field: 0}))


def test_image_size_mismatch_is_input_error(run, tmp_path):
    # Resuming the 16px model while asking for 8px data.
    with pytest.raises(InputError, match="resolution 8 conflicts with the resumed model"):
        _train(_tiny(tmp_path / "r", resume=str(run.model), resolution=8, steps=21))


def test_resume_with_unknown_preset_is_not_a_key_error(run, tmp_path):
    try:
        _train(_tiny(tmp_path / "r", preset="nope", resume=str(run.model), steps=21))
    except InputError:
        pass  # a clear message is fine; training at the model's resolution is fine too


def test_resume_survives_a_leftover_old_checkpoint(run, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run.first, out)
    (out / "checkpoint.old" / "unet").mkdir(parents=True)
    (out / "checkpoint.old" / "state.json").write_text("{}")
    _train(_tiny(out, steps=12, checkpoint_every=5))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 12


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_weights_different_seed_different(tmp_path):
    a = _train(_tiny(tmp_path / "a", steps=2, seed=3))
    b = _train(_tiny(tmp_path / "b", steps=2, seed=3))
    c = _train(_tiny(tmp_path / "c", steps=2, seed=4))
    wa, wb, wc = (load_file(str(p / WEIGHTS)) for p in (a, b, c))
    assert _weights_equal(wa, wb)
    assert not _weights_equal(wa, wc)


def test_same_seed_same_weights_whatever_the_global_rng(tmp_path):
    a = _train(_tiny(tmp_path / "a", steps=2, seed=3), init_seed=1)
    b = _train(_tiny(tmp_path / "b", steps=2, seed=3), init_seed=2)
    assert _weights_equal(load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS)))


# ------------------------------------------------------------------------------ schedules


def test_loss_weights():
    ac = ddpm_scheduler().alphas_cumprod.to(torch.float64)
    t = torch.arange(1000)
    ones = loss_weights(t, ac, None)
    assert ones.dtype == torch.float32 and torch.equal(ones, torch.ones(1000))

    w = loss_weights(t, ac, 5.0).double().numpy()
    a = ac.numpy()
    snr = a / (1 - a)
    expected = np.minimum(snr, 5.0) / snr
    np.testing.assert_allclose(w, expected, rtol=1e-6)  # float32 output
    # SNR falls with t: weight < 1 while SNR > 5, exactly 1 once SNR <= 5.
    assert (w[snr > 5] < 1).all() and (w[snr <= 5] == 1).all()
    assert (snr > 5).any() and (snr <= 5).any()
    np.testing.assert_allclose(loss_weights(torch.tensor([3, 3]), ac, 5.0).numpy(),
                               [expected[3]] * 2, rtol=1e-6)


def test_lr_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    # Linear warm-up reaching the peak at its last step.
    for s in range(10):
        assert lr_at(s, cfg) == pytest.approx(1e-3 * (s + 1) / 10, rel=1e-12)
    assert lr_at(10, cfg) == pytest.approx(1e-3, rel=1e-12)
    # Half-way through the decay the cosine is at the mean of peak and floor.
    assert lr_at(60, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4), rel=1e-12)
    assert lr_at(110, cfg) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(500, cfg) == pytest.approx(1e-4, rel=1e-12)  # clamped past the end
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(decay, decay[1:], strict=False))
    const = replace(cfg, lr_schedule="constant")
    assert lr_at(5, const) == pytest.approx(6e-4) and lr_at(100, const) == 1e-3
