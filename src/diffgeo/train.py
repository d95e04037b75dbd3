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
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffgeo.errors import InputError

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

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in
                   {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if not files:
        raise InputError(f"data: no images (.png/.jpg/.jpeg/.webp/.bmp) found under {folder}")
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


def _save_checkpoint(ckpt: Path, unet, ema: _EMA, opt, step: int, config: TrainConfig,
                     gen: torch.Generator) -> None:
    import shutil

    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    old = ckpt.with_name(ckpt.name + ".old")
    for leftover in (tmp, old):  # from a run killed while saving
        if leftover.exists():
            shutil.rmtree(leftover)
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
        shutil.rmtree(old)
    else:
        tmp.rename(ckpt)


def _find_checkpoint(ckpt: Path) -> Path | None:
    """The newest complete checkpoint of a run, also after a kill in the middle of saving."""
    for cand in (ckpt, ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")):
        if (cand / "state.json").is_file():
            return cand
    return None


def train(config: TrainConfig, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> Path:
    """Run (or resume) training; returns the exported model folder."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.preset not in MODEL_PRESETS:
        raise InputError(f"preset must be one of {sorted(MODEL_PRESETS)}, got {config.preset!r}")
    if config.batch_size < 1 or config.steps < 1:
        raise InputError("batch_size and steps must be >= 1")
    out = Path(config.out)
    ckpt = out / "checkpoint"
    device = torch.device(config.device)
    gen = torch.Generator().manual_seed(config.seed)

    start_step = 0
    opt_state = None
    resume = Path(config.resume) if config.resume else _find_checkpoint(ckpt)
    if resume is not None:
        if (resume / "state.json").is_file():  # a checkpoint
            unet = UNet2DModel.from_pretrained(resume / "unet")
            state = json.loads((resume / "state.json").read_text())
            start_step = int(state["step"])
            extra = torch.load(resume / "optimizer.pt", weights_only=True)
            opt_state = extra["optimizer"]
            gen.set_state(extra["rng"])
            ema = _EMA(unet, config.ema_decay, config.ema_warmup)
            ema.shadow = load_file(str(resume / "ema.safetensors"))
            ema.updates = int(extra["ema_updates"])
        elif (resume / "unet").is_dir() or (resume / "config.json").is_file():  # a model
            sub = resume / "unet" if (resume / "unet").is_dir() else resume
            unet = UNet2DModel.from_pretrained(sub)
            # The shipped weights already are an average: continue it without warm-up.
            ema = _EMA(unet, config.ema_decay, warmup=False)
            prev = resume / "training.json"
            if prev.is_file():
                start_step = int(json.loads(prev.read_text()).get("total_steps", 0))
        else:
            raise InputError(f"resume: {resume} is neither a checkpoint nor a model folder")
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
    if config.resolution is not None and config.resolution != res:
        raise InputError(f"resolution {config.resolution} conflicts with the resumed model, "
                         f"which is {res}px: leave resolution unset to train at {res}px")
    data = load_training_images(config, res)
    if data.shape[-1] != res:
        raise InputError(f"training images are {data.shape[-1]}px, the model expects {res}px")
    sched = ddpm_scheduler()
    ac = sched.alphas_cumprod.to(torch.float64)
    sqrt_ab, sqrt_1m = ac.sqrt().float().to(device), (1 - ac).sqrt().float().to(device)

    log_path = out / "train_log.csv"
    out.mkdir(parents=True, exist_ok=True)
    new_log = not log_path.exists()
    log = open(log_path, "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "loss", "lr", "seconds"])
    t0 = time.time()
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, desc="train")
    running = None
    step = start_step
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
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        opt.step()
        ema.update(unet)
        lv = loss.item()
        running = lv if running is None else 0.98 * running + 0.02 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if (step + 1) % 10 == 0:
            writer.writerow([step + 1, f"{running:.5f}", f"{opt.param_groups[0]['lr']:.3e}",
                             f"{time.time() - t0:.1f}"])
            log.flush()
        if on_step is not None:
            on_step(step + 1, lv)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save_checkpoint(ckpt, unet, ema, opt, step + 1, config, gen)
    bar.close()
    log.close()

    final = config.steps if config.steps > start_step else start_step
    export = UNet2DModel.from_config(unet.config)
    ema.copy_to(export)
    card = {"total_steps": final, "config": asdict(config),
            "seconds_this_run": round(time.time() - t0, 1)}
    return export_model(export.to("cpu"), out / "model", card)


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
