"""Train a pixel-space DDPM (diffusers ``UNet2DModel``) on the scene set or on a folder of images.

The objective is the standard ε-prediction loss on the DDPM forward process (linear betas
1e-4 → 0.02, T = 1000), optionally weighted by min-SNR-γ (Hang et al. 2023), which converges
several times faster for small budgets without changing what the optimum is. EMA weights are kept
and exported. A run writes, under ``out``:

    checkpoint/            resumable state (raw + EMA U-Net, optimiser, step, RNG) — safetensors
                           for weights, a weights-only torch file for the optimiser
    model/                 the exported model: model_index.json, unet/ (EMA weights), scheduler/
                           (a DDPMPipeline-compatible folder that ``load_backbone`` reads)
    train_log.csv          step, loss, lr, seconds

``resume`` accepts a checkpoint folder (continues exactly) or a model folder (continues from its
weights with a fresh optimiser): the shipped default model is such a folder.

Every setting is checked by :func:`check_config` before anything is read or written (the ``train``
verb runs the same function with its flag names). A non-empty ``out`` is written into only when
it already holds a run of ours (its ``train_log.csv``, a checkpoint's ``state.json`` or the
model's ``training.json``), when ``resume`` lies inside it, or with ``force``; even then only the
names above are replaced, and a folder holding anything training does not write is never
deleted. A loss, gradient or weight that stops being finite ends the run with a
:class:`~diffgeo.errors.NonFiniteError`: the last checkpoint stays as it was and no model is
exported.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import numbers
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffgeo.errors import InputError, NonFiniteError, OutputExistsError, check_int

MODEL_PRESETS: dict[str, dict] = {
    # 32x32, 3.9M parameters, 0.75 s per batch-32 step on 2 CPU cores (the 64-channel top level
    # costs twice that). Attention at 8x8 and in the mid block, GroupNorm with 8 groups
    # (several channels per group): the code paths of real checkpoints, on a CPU budget.
    "default-32": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    ),
    # The same shape at 64x64 with one more level, for GPU training.
    "default-64": dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(64, 96, 128, 192),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
    ),
    # For tests: tiny, still with attention and multi-channel GroupNorm groups.
    "tiny-16": dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
}


@dataclass
class TrainConfig:
    out: str = "runs/default"
    data: str = "scenes"  # "scenes" or a folder of images
    preset: str = "default-32"
    resolution: int | None = None  # default: the preset's sample_size
    num_scenes: int = 20000  # size of the fixed training set drawn from the scene generator
    steps: int = 1000  # total optimiser steps (a resumed run continues up to this number)
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # "cosine" | "constant"
    min_lr_ratio: float = 0.1
    min_snr_gamma: float | None = 5.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float = 1.0
    hflip: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    device: str = "cpu"
    threads: int | None = None
    resume: str | None = None
    force: bool = False  # write into a non-empty out that holds no run of ours
    extra: dict = field(default_factory=dict)


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        prediction_type="epsilon", clip_sample=True,
    )


def build_unet(preset: str, resolution: int | None = None):
    from diffusers import UNet2DModel

    if preset not in MODEL_PRESETS:
        raise InputError(f"preset must be one of {sorted(MODEL_PRESETS)}, got {preset!r}")
    cfg = dict(MODEL_PRESETS[preset])
    if resolution is not None:
        cfg["sample_size"] = resolution
    return UNet2DModel(**cfg)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# What each folder training writes may hold (fnmatch patterns of paths inside it). Anything else
# in such a folder is someone else's, and the folder is then never deleted or replaced.
_UNET_FILES = ("unet/config.json", "unet/diffusion_pytorch_model*.safetensors",
               "unet/diffusion_pytorch_model.safetensors.index.json")
_CHECKPOINT_FILES = ("state.json", "ema.safetensors", "optimizer.pt", *_UNET_FILES)
_MODEL_FILES = ("model_index.json", "training.json", "scheduler/scheduler_config.json",
                *_UNET_FILES)
TRAIN_LOG = "train_log.csv"
_LOG_HEADER = ["step", "loss", "lr", "seconds"]


def _flag(name: str, flags: Mapping[str, str] | None) -> str:
    # The verb passes its command-line flags so that its user reads the names they typed; the
    # Python API's user reads the field names.
    return (flags or {}).get(name, name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _check_real(value: Any, name: str, expected: str, ok: Callable[[float], bool]) -> None:
    # Non-finite values are refused before the range test so that no phrasing of a range lets
    # NaN through (every comparison with NaN is False, so `not v > 0` and `v <= 0` disagree).
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or not ok(float(value))):
        raise InputError(f"{name} must be {expected}, got {value!r}")


def _check_device(device: Any, name: str) -> None:
    """Refuse a device torch cannot parse or this machine does not have, before any work: torch
    itself only fails at the first tensor moved there, after the data is loaded."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{name} must be a device such as cpu, cuda, cuda:1 or mps, got "
                         f"{device!r}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError(f"{name} {device}: no CUDA GPU is available here; use cpu")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{name} {device}: there is no such GPU; this machine has {count} "
                             f"(cuda:0 to cuda:{count - 1})")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{name} {device}: MPS is not available here; use cpu")
        return
    raise InputError(f"{name} must be cpu, cuda, cuda:N or mps, got {device!r}")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _find_checkpoint(ckpt: Path) -> Path | None:
    """The newest complete checkpoint of a run, also after a kill in the middle of saving."""
    for cand in (ckpt, ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")):
        # state.json is written last, so it marks a whole folder; the other files are checked
        # too so that one a user emptied is not loaded half-way.
        if all((cand / f).is_file() for f in ("state.json", "ema.safetensors", "optimizer.pt",
                                              "unet/config.json")):
            return cand
    return None


def _checkpoint_step(folder: Path, name: str) -> int:
    state = _read_json(folder / "state.json")
    step = state.get("step") if state else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"{name}: {folder}/state.json is damaged (no step count); resume from "
                         "another checkpoint or the run's model folder")
    return step


def _resume_source(resume: str | Path, name: str) -> tuple[Path, str]:
    """The folder to continue from and its kind ("checkpoint" or "model"), or an InputError
    naming ``name``."""
    path = Path(resume)
    if not path.exists():
        # A run killed between the two renames of a checkpoint swap has no checkpoint/ but a
        # whole checkpoint.tmp (or .old) beside it: that is what the user meant.
        found = _find_checkpoint(path)
        if found is None:
            raise InputError(f"{name} {path} does not exist (give a run's checkpoint folder, "
                             "a model folder, or 'default')")
        path = found
    if not path.is_dir():
        raise InputError(f"{name}: {path} is neither a checkpoint nor a model folder (it is a "
                         "file)")
    if (path / "state.json").is_file():
        missing = [f for f in ("ema.safetensors", "optimizer.pt", "unet/config.json")
                   if not (path / f).is_file()]
        if missing:
            raise InputError(f"{name}: {path} is an incomplete checkpoint (no "
                             f"{', '.join(missing)})")
        _checkpoint_step(path, name)
        return path, "checkpoint"
    sub = path / "unet" if (path / "unet").is_dir() else path
    if (sub / "config.json").is_file():
        if not any(sub.glob("diffusion_pytorch_model*")):
            raise InputError(f"{name}: {path} is a model folder without weights "
                             f"(no {sub.name}/diffusion_pytorch_model.safetensors)")
        return path, "model"
    raise InputError(f"{name}: {path} is neither a checkpoint nor a model folder (no state.json, "
                     "unet/ or config.json)")


def _check_resolution(config: TrainConfig, res: int, flags: Mapping[str, str] | None) -> None:
    if config.resolution is not None and config.resolution != res:
        name = _flag("resolution", flags)
        raise InputError(f"{name} {config.resolution} conflicts with the resumed model, which "
                         f"is {res}px: leave {name} unset to train at {res}px")


def check_config(config: TrainConfig, flags: Mapping[str, str] | None = None) -> None:
    """Refuse an unusable setting with one :class:`InputError` naming it, before any work.

    ``flags`` maps config fields to the names the messages use (the ``train`` verb passes its
    command-line flags). Reads only the ``data`` and ``resume`` folders; writes nothing."""
    def n(name: str) -> str:
        return _flag(name, flags)

    if config.preset not in MODEL_PRESETS:
        raise InputError(f"{n('preset')} must be one of {sorted(MODEL_PRESETS)}, got "
                         f"{config.preset!r}")
    for name in ("steps", "batch_size", "checkpoint_every", "num_scenes"):
        check_int(getattr(config, name), n(name), 1)
    check_int(config.warmup_steps, n("warmup_steps"), 0)
    check_int(config.seed, n("seed"), 0)  # numpy's generators refuse negative seeds
    for name in ("threads", "resolution"):
        if getattr(config, name) is not None:
            check_int(getattr(config, name), n(name), 1)
    if config.resolution is not None:
        # Each level but the last halves the image; an odd size there breaks the skip joins.
        factor = 2 ** (len(MODEL_PRESETS[config.preset]["block_out_channels"]) - 1)
        if config.resolution % factor:
            raise InputError(f"{n('resolution')} must be a multiple of {factor} for preset "
                             f"{config.preset}, got {config.resolution}")
    _check_real(config.lr, n("lr"), "a finite number > 0", lambda v: v > 0)
    _check_real(config.min_lr_ratio, n("min_lr_ratio"), "a number in [0, 1]",
                lambda v: 0 <= v <= 1)
    _check_real(config.ema_decay, n("ema_decay"), "a number in [0, 1)", lambda v: 0 <= v < 1)
    if config.grad_clip is not None:
        _check_real(config.grad_clip, n("grad_clip"), "a finite number >= 0 (0 or None: no "
                    "clipping)", lambda v: v >= 0)
    if config.min_snr_gamma is not None:
        _check_real(config.min_snr_gamma, n("min_snr_gamma"), "a finite number > 0 (None: no "
                    "weighting)", lambda v: v > 0)
    if config.lr_schedule not in ("cosine", "constant"):
        raise InputError(f"{n('lr_schedule')} must be cosine or constant, got "
                         f"{config.lr_schedule!r}")
    for name in ("hflip", "ema_warmup", "force"):
        if not isinstance(getattr(config, name), bool):
            raise InputError(f"{n(name)} must be true or false, got {getattr(config, name)!r}")
    if not isinstance(config.out, (str, os.PathLike)) or not str(config.out).strip():
        raise InputError(f"{n('out')} must be a folder path, got {config.out!r}")
    _check_device(config.device, n("device"))

    if not isinstance(config.data, (str, os.PathLike)):
        raise InputError(f"{n('data')} must be 'scenes' or a folder of images, got "
                         f"{config.data!r}")
    if config.data != "scenes":
        folder = Path(config.data)
        if not folder.exists():
            raise InputError(f"{n('data')} must be 'scenes' or an existing folder of images, "
                             f"got {folder}")
        if not folder.is_dir():
            raise InputError(f"{n('data')} must be 'scenes' or a folder of images, got the file "
                             f"{folder}")
        if not _image_files(folder):
            raise InputError(f"{n('data')}: no images ({'/'.join(IMAGE_SUFFIXES)}) found under "
                             f"{folder}")

    if config.resume is not None:
        if not isinstance(config.resume, (str, os.PathLike)):
            raise InputError(f"{n('resume')} must be a folder path, got {config.resume!r}")
        path, kind = _resume_source(config.resume, n("resume"))
        sub = path / "unet" if (path / "unet").is_dir() else path
        res = (_read_json(sub / "config.json") or {}).get("sample_size")
        if isinstance(res, int):
            _check_resolution(config, res, flags)


def load_training_images(config: TrainConfig, res: int | None = None) -> torch.Tensor:
    """The training set at ``res`` px (default: the config's) as uint8 (N, 3, H, W): small in
    memory, converted per batch."""
    if res is None:
        if config.preset not in MODEL_PRESETS:
            raise InputError(f"preset must be one of {sorted(MODEL_PRESETS)}, "
                             f"got {config.preset!r}")
        res = config.resolution or MODEL_PRESETS[config.preset]["sample_size"]
    if config.data == "scenes":
        from diffgeo.data.scenes import SceneConfig, generate_scenes

        scenes = generate_scenes(config.num_scenes, seed=config.seed, split="train",
                                 config=SceneConfig(size=res))
        arr = np.stack([np.round(s.composite * 255).astype(np.uint8) for s in scenes])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    folder = Path(config.data)
    if not folder.is_dir():
        raise InputError(f"data must be 'scenes' or an existing folder of images, got {folder}")
    from diffgeo.io import load_image

    files = _image_files(folder)
    if not files:
        raise InputError(f"data: no images ({'/'.join(IMAGE_SUFFIXES)}) found under {folder}")
    out = []
    for f in files:
        x, _ = load_image(f, size=(res, res), fit="crop")
        out.append(((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                 gamma: float | None) -> torch.Tensor:
    """min-SNR-γ weights for ε-prediction: min(SNR, γ) / SNR (ones when γ is None)."""
    if gamma is None:
        return torch.ones_like(timesteps, dtype=torch.float32)
    ab = alphas_cumprod[timesteps].double()
    snr = ab / (1 - ab)
    return (torch.clamp(snr, max=gamma) / snr).float()


class _EMA:
    """Exponential moving average of parameters with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay
        if self.warmup:
            d = min(d, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


def export_model(unet, out_dir: Path, card: dict | None = None) -> Path:
    """Write a DDPMPipeline-compatible folder (safetensors weights)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    ddpm_scheduler().save_pretrained(out_dir / "scheduler")
    import diffusers

    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if card is not None:
        (out_dir / "training.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    return out_dir


# ----------------------------------------------------------------------------- what training owns
def _holds_our_run(out: Path) -> bool:
    """Whether ``out`` holds a diffgeo train run: the log's header (written when a run starts),
    a checkpoint's state.json or the model's training.json. These files are the marker: a run
    folder holds exactly checkpoint/, model/ and train_log.csv, nothing beside them."""
    log = out / TRAIN_LOG
    if log.is_file() and not log.is_symlink():
        try:
            with open(log, "rb") as f:
                first = f.readline(256)
        except OSError:
            first = b""
        if first.rstrip(b"\r\n") == ",".join(_LOG_HEADER).encode():
            return True
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        state = _read_json(out / name / "state.json")
        if state and "step" in state and "config" in state:
            return True
    card = _read_json(out / "model" / "training.json")
    return bool(card and "total_steps" in card and "config" in card)


def _foreign(folder: Path, patterns: Iterable[str]) -> list[str]:
    """What under ``folder`` training did not write, as paths relative to it (empty: the folder
    may be deleted). A symlink always counts: deleting through one could reach anything."""
    if folder.is_symlink() or not folder.is_dir():
        return [folder.name]
    patterns = tuple(patterns)
    dirs = {p.split("/")[0] for p in patterns if "/" in p}
    found: list[str] = []
    for root, subdirs, files in os.walk(folder):
        here = Path(root)
        rel = here.relative_to(folder)
        keep = []
        for d in subdirs:
            r = (rel / d).as_posix()
            if (here / d).is_symlink() or r not in dirs:
                found.append(r + "/")
            else:
                keep.append(d)
        subdirs[:] = keep
        for f in files:
            r = (rel / f).as_posix()
            if (here / f).is_symlink() or not any(fnmatch.fnmatchcase(r, p) for p in patterns):
                found.append(r)
    return sorted(found)


def _not_ours(folder: Path, foreign: list[str],
              flags: Mapping[str, str] | None) -> OutputExistsError:
    listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return OutputExistsError(
        f"{folder} holds files diffgeo train did not write ({listed}), so training will not "
        f"delete or replace it (not even with {_flag('force', flags)}): move them away or "
        f"choose another {_flag('out', flags)}")


def _remove_ours(folder: Path, patterns: Iterable[str], flags: Mapping[str, str] | None) -> None:
    if not (folder.exists() or folder.is_symlink()):
        return
    foreign = _foreign(folder, patterns)
    if foreign:
        raise _not_ours(folder, foreign, flags)
    shutil.rmtree(folder)


def _claim_out(config: TrainConfig, flags: Mapping[str, str] | None) -> Path:
    """``config.out`` once it is safe to train into; refuses (writing nothing) a folder of
    someone else's, and any name training replaces that holds what training did not write.
    Checked up front so that a refusal comes before the hours of training, not after."""
    out, out_flag = Path(config.out), _flag("out", flags)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out_flag} {out} is a file, not a folder; choose another "
                                f"{out_flag}")
    if out.is_dir() and any(out.iterdir()) and not config.force and not _holds_our_run(out):
        inside = config.resume is not None and \
            Path(config.resume).resolve().is_relative_to(out.resolve())
        if not inside:
            raise OutputExistsError(
                f"{out_flag} {out} is not empty and holds no diffgeo train run; choose a new or "
                f"empty folder, or pass {_flag('force', flags)} to train into it (only "
                f"checkpoint/, model/ and {TRAIN_LOG} are written there; nothing else is "
                "touched)")
    for base, patterns in (("checkpoint", _CHECKPOINT_FILES), ("model", _MODEL_FILES)):
        for name in (base, base + ".tmp", base + ".old"):
            p = out / name
            if p.exists() or p.is_symlink():
                foreign = _foreign(p, patterns)
                if foreign:
                    raise _not_ours(p, foreign, flags)
    log = out / TRAIN_LOG
    if (log.exists() or log.is_symlink()) and (log.is_symlink() or not log.is_file()):
        raise OutputExistsError(f"{log} is not a plain file, so training will not write its log "
                                f"there: move it away or choose another {out_flag}")
    return out


def _recover_checkpoint(ckpt: Path) -> Path | None:
    """The run's newest whole checkpoint, moved back to ``ckpt`` when a kill between the two
    renames of a swap left it as .tmp or .old: the next save clears those names first, and must
    not clear the only whole checkpoint there is."""
    found = _find_checkpoint(ckpt)
    if found is not None and found != ckpt and not (ckpt.exists() or ckpt.is_symlink()):
        found.rename(ckpt)
        return ckpt
    return found


def _save_checkpoint(ckpt: Path, unet, ema: _EMA, opt, step: int, config: TrainConfig,
                     gen: torch.Generator, flags: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    old = ckpt.with_name(ckpt.name + ".old")
    for leftover in (tmp, old):  # from a run killed while saving
        _remove_ours(leftover, _CHECKPOINT_FILES, flags)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "rng": gen.get_state(), "ema_updates": ema.updates},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": asdict(config)},
                                               indent=2, default=str))
    # state.json is written last: its presence marks a complete folder. Swap the complete folder
    # in; a kill between the renames leaves checkpoint.tmp (complete) for _find_checkpoint.
    if ckpt.exists():
        ckpt.rename(old)
        tmp.rename(ckpt)
        _remove_ours(old, _CHECKPOINT_FILES, flags)
    else:
        tmp.rename(ckpt)


def _export(unet, model_dir: Path, card: dict, flags: Mapping[str, str] | None) -> Path:
    """export_model into a staging folder swapped in whole: a kill or a full disk mid-export
    leaves the previous model as it was, never half of each."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    old = model_dir.with_name(model_dir.name + ".old")
    for leftover in (tmp, old):
        _remove_ours(leftover, _MODEL_FILES, flags)
    if model_dir.exists() or model_dir.is_symlink():
        foreign = _foreign(model_dir, _MODEL_FILES)  # checked again: the run may have been long
        if foreign:
            raise _not_ours(model_dir, foreign, flags)
    export_model(unet, tmp, card)
    if model_dir.exists():
        model_dir.rename(old)
        tmp.rename(model_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(model_dir)
    return model_dir


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _stopped(what: str, config: TrainConfig, flags: Mapping[str, str] | None,
             saved: tuple[int, Path] | None) -> NonFiniteError:
    hint = f"lower the learning rate ({_flag('lr', flags)}, now {config.lr:g})"
    if not config.grad_clip:
        hint += f" or turn gradient clipping on ({_flag('grad_clip', flags)})"
    kept = (f"the checkpoint of step {saved[0]} in {saved[1]} is kept" if saved is not None
            else "no checkpoint was written")
    return NonFiniteError(f"{what}; training stopped: {hint}. {kept[0].upper()}{kept[1:]} and "
                          "no model was exported")


def train(config: TrainConfig, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None,
          flags: Mapping[str, str] | None = None) -> Path:
    """Run (or resume) training; returns the exported model folder.

    Every setting is checked first (:func:`check_config`); ``flags`` maps config fields to the
    names errors use (the ``train`` verb passes its command-line flags). A non-finite loss,
    gradient norm or weight stops the run with a :class:`NonFiniteError`, keeping the last
    checkpoint and exporting nothing."""
    # Before the imports below: a refusal should not wait seconds for diffusers to load.
    check_config(config, flags)
    out = _claim_out(config, flags)

    from diffusers import UNet2DModel
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    ckpt = out / "checkpoint"
    device = torch.device(config.device)
    gen = torch.Generator().manual_seed(config.seed)

    start_step = 0
    opt_state = None
    found = _recover_checkpoint(ckpt) if out.is_dir() else None
    if config.resume:
        resume, kind = _resume_source(config.resume, _flag("resume", flags))
    else:
        resume, kind = found, "checkpoint"
    saved: tuple[int, Path] | None = None  # the newest checkpoint on disk, for error messages
    if resume is not None and kind == "checkpoint":
        unet = UNet2DModel.from_pretrained(resume / "unet")
        start_step = _checkpoint_step(resume, _flag("resume", flags))
        extra = torch.load(resume / "optimizer.pt", weights_only=True)
        opt_state = extra["optimizer"]
        gen.set_state(extra["rng"])
        ema = _EMA(unet, config.ema_decay, config.ema_warmup)
        ema.shadow = load_file(str(resume / "ema.safetensors"))
        ema.updates = int(extra["ema_updates"])
        saved = (start_step, resume)
    elif resume is not None:
        sub = resume / "unet" if (resume / "unet").is_dir() else resume
        unet = UNet2DModel.from_pretrained(sub)
        # The shipped weights already are an average: continue it without warm-up.
        ema = _EMA(unet, config.ema_decay, warmup=False)
        prev = resume / "training.json"
        if prev.is_file():
            start_step = int(json.loads(prev.read_text()).get("total_steps", 0))
    else:
        # The initialisation follows config.seed and leaves the global RNG as it was.
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            unet = build_unet(config.preset, config.resolution)
        ema = _EMA(unet, config.ema_decay, config.ema_warmup)

    unet.to(device).train()
    ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    if opt_state is not None:
        opt.load_state_dict(opt_state)

    res = unet.config.sample_size
    _check_resolution(config, res, flags)
    data = load_training_images(config, res)
    if data.shape[-1] != res:
        raise InputError(f"training images are {data.shape[-1]}px, the model expects {res}px")
    sched = ddpm_scheduler()
    ac = sched.alphas_cumprod.to(torch.float64)
    sqrt_ab, sqrt_1m = ac.sqrt().float().to(device), (1 - ac).sqrt().float().to(device)

    log_path = out / TRAIN_LOG
    out.mkdir(parents=True, exist_ok=True)
    new_log = not log_path.exists()
    t0 = time.time()
    # No clipping is clipping at infinity: the norm is still needed to stop at a non-finite
    # gradient, and scaling by exactly 1 leaves the gradients bit for bit as they were.
    max_norm = config.grad_clip if config.grad_clip else math.inf
    with open(log_path, "a", newline="") as log:
        writer = csv.writer(log)
        if new_log:
            # The header is written (and flushed) first: it marks the folder as a run of ours
            # for the next call, even if this one is killed before its first checkpoint.
            writer.writerow(_LOG_HEADER)
            log.flush()
        bar = tqdm(total=config.steps, initial=start_step, disable=not progress, desc="train")
        running = None
        try:
            for step in range(start_step, config.steps):
                idx = torch.randint(0, len(data), (config.batch_size,), generator=gen)
                x0 = data[idx].float().div_(127.5).sub_(1.0)
                if config.hflip:
                    flip = torch.rand(config.batch_size, generator=gen) < 0.5
                    x0[flip] = x0[flip].flip(-1)
                x0 = x0.to(device)
                t = torch.randint(0, 1000, (config.batch_size,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                td = t.to(device)
                xt = sqrt_ab[td, None, None, None] * x0 + sqrt_1m[td, None, None, None] * noise
                pred = unet(xt, td).sample
                w = loss_weights(t, ac, config.min_snr_gamma).to(device)
                loss = (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
                lv = loss.item()
                if not math.isfinite(lv):
                    raise _stopped(f"training loss at step {step + 1} is {lv}", config, flags,
                                   saved)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, config)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = float(torch.nn.utils.clip_grad_norm_(unet.parameters(), max_norm))
                if not math.isfinite(norm):
                    raise _stopped(f"gradient norm at step {step + 1} is {norm}", config, flags,
                                   saved)
                opt.step()
                ema.update(unet)
                running = lv if running is None else 0.98 * running + 0.02 * lv
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
                if (step + 1) % 10 == 0:
                    writer.writerow([step + 1, f"{running:.5f}",
                                     f"{opt.param_groups[0]['lr']:.3e}",
                                     f"{time.time() - t0:.1f}"])
                    log.flush()
                if on_step is not None:
                    on_step(step + 1, lv)
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                    # A finite loss does not prove finite weights (an overflow in the update
                    # shows only in the next forward pass): a checkpoint must never hold NaN.
                    if not (_all_finite(unet.parameters()) and _all_finite(ema.shadow.values())):
                        raise _stopped(f"the weights after step {step + 1} are not finite",
                                       config, flags, saved)
                    _save_checkpoint(ckpt, unet, ema, opt, step + 1, config, gen, flags)
                    saved = (step + 1, ckpt)
        finally:
            bar.close()

    final = config.steps if config.steps > start_step else start_step
    arch = dict(unet.config)
    # A resumed U-Net's config records the folder it was read from; like export_checkpoint,
    # the exported model must not carry that local path.
    arch.pop("_name_or_path", None)
    export = UNet2DModel.from_config(arch)
    ema.copy_to(export)
    if not _all_finite(export.state_dict().values()):
        raise _stopped("the EMA weights to export are not finite", config, flags, saved)
    card = {"total_steps": final, "config": asdict(config),
            "seconds_this_run": round(time.time() - t0, 1)}
    return _export(export.to("cpu"), out / "model", card, flags)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Export the EMA weights of a (possibly still running) training checkpoint as a model."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    ckpt = Path(checkpoint)
    if not (ckpt / "state.json").is_file():
        raise InputError(f"{ckpt} is not a training checkpoint (no state.json)")
    state = json.loads((ckpt / "state.json").read_text())
    config = dict(UNet2DModel.load_config(ckpt / "unet"))
    # load_config records where it read from; a shipped model must not carry a local path.
    config.pop("_name_or_path", None)
    unet = UNet2DModel.from_config(config)
    unet.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    card = {"total_steps": int(state["step"]), "config": state["config"]}
    return export_model(unet, Path(out), card)
