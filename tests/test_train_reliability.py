"""diffgeo train is reliable: settings are refused before any work (CLI and API alike), a folder
that is not a training run is never written into or deleted from, a non-finite loss stops the
run keeping the last checkpoint, and a run killed with SIGKILL resumes from its checkpoint."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _assert_user_error
from PIL import Image
from typer.testing import CliRunner

from diffgeo.backbones import load_backbone
from diffgeo.cli import app
from diffgeo.errors import DiffgeoError, InputError, NonFiniteError, OutputExistsError
from diffgeo.train import TrainConfig, build_unet, check_config, export_model, train
from diffgeo.verbs.model import TrainOptions

ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "HF_HUB_OFFLINE": "1"}
NAN, INF = float("nan"), float("inf")
TINY = ["--preset", "tiny-16", "--num-scenes", "16", "--batch-size", "2", "--warmup", "0"]


def _tiny(out: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny-16", data="scenes", num_scenes=16, steps=2, batch_size=2,
                checkpoint_every=2, warmup_steps=0, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg: TrainConfig) -> Path:
    with torch.random.fork_rng():
        return train(cfg, progress=False)


def _invoke(*args) -> object:
    return CliRunner().invoke(app, ["train", *(str(a) for a in args)], env=ENV)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _eps_is_finite(model: Path) -> bool:
    with torch.no_grad():
        return bool(torch.isfinite(load_backbone(model).eps(torch.zeros(1, 3, 16, 16), 500)).all())


# ------------------------------------------------------------------------------ settings

BAD_CONFIG = [
    ("steps", 0), ("steps", 2.5), ("batch_size", 0), ("checkpoint_every", 0),
    ("num_scenes", 0), ("warmup_steps", -1), ("seed", -1), ("threads", 0),
    ("resolution", 15),  # tiny-16 halves once: an odd size cannot be joined back
    ("lr", 0.0), ("lr", -1e-3), ("lr", NAN), ("lr", INF),
    ("ema_decay", 1.0), ("ema_decay", 1.5), ("ema_decay", -0.1), ("ema_decay", NAN),
    ("grad_clip", -1.0), ("grad_clip", NAN), ("grad_clip", INF),
    ("min_snr_gamma", 0.0), ("min_snr_gamma", -1.0), ("min_snr_gamma", NAN),
    ("min_lr_ratio", 1.5), ("min_lr_ratio", -0.1), ("min_lr_ratio", NAN),
    ("lr_schedule", "linear"), ("device", "cuda:999"), ("device", "gpu0"),
    ("device", "cuda:x"),
]


@pytest.mark.parametrize(("field", "value"), BAD_CONFIG, ids=lambda v: repr(v))
def test_api_refuses_a_bad_setting_before_any_work(tmp_path, field, value):
    out = tmp_path / "run"
    with pytest.raises(InputError) as e:
        _train(_tiny(out, **{field: value}))
    assert str(e.value).startswith(field), str(e.value)
    assert not out.exists()  # refused before the run folder was made


BAD_FLAGS = [
    ("--lr", "nan"), ("--lr", "0"), ("--lr", "inf"), ("--ema-decay", "1.5"),
    ("--ema-decay", "nan"), ("--warmup", "-1"), ("--steps", "0"), ("--batch-size", "0"),
    ("--checkpoint-every", "0"), ("--num-scenes", "0"), ("--min-snr-gamma", "nan"),
    ("--min-snr-gamma", "-1"), ("--device", "cuda:999"), ("--device", "gpu0"),
    ("--seed", "-1"), ("--resolution", "15"), ("--threads", "0"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS, ids=lambda v: str(v))
def test_cli_refuses_a_bad_flag_in_one_line_naming_it(tmp_path, flag, value):
    out = tmp_path / "run"
    _assert_user_error(_invoke(*TINY, "--steps", 1, "--out", out, flag, value), flag)
    assert not out.exists()


def test_a_cuda_index_past_the_machines_gpus_is_refused(tmp_path, monkeypatch):
    # Without a GPU here, the machine is made to report one: cuda:0 passes, cuda:7 does not.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_config(_tiny(tmp_path / "r", device="cuda:0"))
    check_config(_tiny(tmp_path / "r", device="cuda"))
    with pytest.raises(InputError, match=r"^device cuda:7: there is no such GPU.*has 1"):
        check_config(_tiny(tmp_path / "r", device="cuda:7"))
    with pytest.raises(InputError, match=r"^--device cuda:7: there is no such GPU"):
        TrainOptions(device="cuda:7")


def test_the_verb_options_check_on_construction_with_the_configs_rules():
    # TrainOptions runs the very function TrainConfig's train() runs, naming the flags.
    with pytest.raises(InputError, match="^--ema-decay must be a number in"):
        TrainOptions(ema_decay=1.0)
    with pytest.raises(InputError, match="^ema_decay must be a number in"):
        _train(_tiny("unused", ema_decay=1.0))


def test_data_must_be_a_folder_with_images(tmp_path):
    image = tmp_path / "one.png"
    Image.new("RGB", (16, 16)).save(image)
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    for data in (image, tmp_path / "empty", tmp_path / "text", tmp_path / "missing"):
        line = _assert_user_error(_invoke(*TINY, "--data", data, "--out", tmp_path / "r"),
                                  "--data", str(data))
        assert "scenes" in line or "no images" in line
        with pytest.raises(InputError, match="^data"):
            _train(_tiny(tmp_path / "r", data=str(data)))
    assert not (tmp_path / "r").exists()


def test_resume_must_be_a_checkpoint_or_model_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 8)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    (tmp_path / "half" / "state.json").write_text('{"step": 3}')
    for resume in (f, tmp_path / "plain", tmp_path / "missing", tmp_path / "half"):
        _assert_user_error(_invoke(*TINY, "--resume", resume, "--out", tmp_path / "r"),
                           "--resume", str(resume))
        with pytest.raises(InputError, match="^resume"):
            _train(_tiny(tmp_path / "r", resume=str(resume)))
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ output folder


def test_a_foreign_non_empty_out_is_refused_unless_forced(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.txt").write_text("mine")
    _assert_user_error(_invoke(*TINY, "--steps", 1, "--out", out), "--out", "--force")
    with pytest.raises(OutputExistsError, match="force"):
        _train(_tiny(out))
    assert _snapshot(out) == {"holiday.txt": b"mine"}

    model = _train(_tiny(out, force=True))
    assert (out / "holiday.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "holiday.txt", "model",
                                                     "train_log.csv"]
    assert _eps_is_finite(model)
    # Now the folder holds a run of ours: continuing it needs no --force.
    _train(_tiny(out, steps=4))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4


def test_out_may_be_non_empty_when_resume_lies_inside_it(tmp_path):
    out = tmp_path / "work"
    base = export_model(build_unet("tiny-16"), out / "base")  # no training.json: not a run
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    model = _train(_tiny(out, resume=str(base)))
    assert model == out / "model" and _eps_is_finite(model)
    # The export does not record the local folder it was resumed from.
    assert "_name_or_path" not in json.loads((model / "unet" / "config.json").read_text())
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of ours replaced


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    _assert_user_error(_invoke(*TINY, "--steps", 1, "--out", f), "--out", "is a file")
    assert f.read_text() == "x"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished two-step run, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    _train(_tiny(out))
    return out


@pytest.mark.parametrize("force", [False, True])
def test_a_checkpoint_leftover_holding_a_user_file_is_never_deleted(run_folder, tmp_path, force):
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    old = out / "checkpoint.old"
    (old / "unet").mkdir(parents=True)
    (old / "state.json").write_text("{}")
    (old / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError) as e:
        _train(_tiny(out, steps=4, force=force))
    assert "checkpoint.old" in str(e.value) and "mine.txt" in str(e.value)
    assert (old / "mine.txt").read_text() == "keep me"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


@pytest.mark.parametrize("force", [False, True])
def test_a_model_folder_holding_a_user_file_is_never_replaced(run_folder, tmp_path, force):
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    (out / "model" / "README.md").write_text("my notes")
    before = _snapshot(out)
    result = _invoke(*TINY, "--steps", 4, "--out", out, *(["--force"] if force else []))
    _assert_user_error(result, "model", "README.md", "--out")
    assert _snapshot(out) == before  # refused up front: not even the checkpoint moved


# ------------------------------------------------------------------------------ finite or fail


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(run_folder, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    model_before = _snapshot(out / "model")
    ckpt_before = _snapshot(out / "checkpoint")
    # An AdamW step moves every weight by about lr: at 1e6 the next forward pass overflows.
    result = _invoke(*TINY, "--steps", 8, "--checkpoint-every", 2, "--lr", "1e6", "--out", out)
    line = _assert_user_error(result, "training loss at step", "is nan", "--lr",
                              "checkpoint of step 2")
    assert "no model was exported" in line
    assert _snapshot(out / "model") == model_before
    assert _snapshot(out / "checkpoint") == ckpt_before
    assert not (out / "checkpoint.tmp").exists() and not (out / "model.tmp").exists()
    # The kept checkpoint continues with a sane learning rate.
    model = _train(_tiny(out, steps=4))
    assert json.loads((model / "training.json").read_text())["total_steps"] == 4
    assert _eps_is_finite(model)


def test_a_fresh_run_that_diverges_exports_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"training loss at step \d+ is nan.*\(lr, now 1e\+06"):
        _train(_tiny(out, steps=8, checkpoint_every=100, lr=1e6))
    assert not (out / "model").exists()
    assert not (out / "checkpoint").exists()
    assert isinstance(NonFiniteError("x"), DiffgeoError)  # the CLI's one-line error


# ------------------------------------------------------------------------------ kill -9


def _whole_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        c = out / name
        if all((c / f).is_file() for f in ("state.json", "ema.safetensors", "optimizer.pt")):
            return c
    return None


def test_resume_after_a_kill_between_the_two_renames_of_a_checkpoint_swap(tmp_path):
    # The state a kill leaves between `checkpoint -> checkpoint.old` and
    # `checkpoint.tmp -> checkpoint`: no checkpoint/, the new one whole as .tmp, the previous
    # one as .old. --resume RUN/checkpoint must continue from the new one.
    out = tmp_path / "run"
    _train(_tiny(out, steps=2))
    shutil.copytree(out / "checkpoint", tmp_path / "step2")
    _train(_tiny(out, steps=4))
    (out / "checkpoint").rename(out / "checkpoint.tmp")
    (tmp_path / "step2").rename(out / "checkpoint.old")
    seen: list[int] = []
    with torch.random.fork_rng():
        train(_tiny(out, steps=5, resume=str(out / "checkpoint")), progress=False,
              on_step=lambda s, loss: seen.append(s))
    assert seen == [5]  # continued from step 4, not 2, and not from scratch
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "model", "train_log.csv"]


def test_a_run_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--steps", 100000, "--checkpoint-every", 5, "--threads", 1,
            "--out", out]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from diffgeo.cli import main; main()", *map(str, args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            state = out / "checkpoint" / "state.json"
            # Step 10: at least one save has swapped a previous checkpoint out.
            if state.is_file() and json.loads(state.read_text() or "{}").get("step", 0) >= 10:
                break
            if proc.poll() is not None:
                pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 60 s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists()  # killed mid-run: nothing was exported

    done = json.loads((_whole_checkpoint(out) / "state.json").read_text())["step"]
    total = done + 3
    result = _invoke(*TINY, "--steps", total, "--checkpoint-every", 5, "--threads", 1,
                     "--resume", out / "checkpoint", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == total
    card = json.loads((out / "model" / "training.json").read_text())
    assert card["total_steps"] == total
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "model", "train_log.csv"]
    bb = load_backbone(out / "model")
    assert bb.summary().image_size == (16, 16)
    assert _eps_is_finite(out / "model")
    assert math.isfinite(float(card["seconds_this_run"]))
