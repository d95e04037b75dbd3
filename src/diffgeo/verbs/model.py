"""``info`` and ``train``: what diffgeo sees in a model, and training one (model)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffgeo.errors import InputError
from diffgeo.verbs.options import (
    DEVICE_HELP,
    MODEL_HELP,
    SEED_HELP,
    ModelOptions,
    Options,
    at_least,
    option,
)
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone


@dataclass(frozen=True, kw_only=True)
class InfoOptions(ModelOptions):
    model: str = option("default", MODEL_HELP, argument=True)
    allow_pickle: bool = option(False, "Allow loading pickle (.bin) weights.")
    as_json: bool = option(False, "Print the summary as JSON.", flags=("--json",))


@dataclass
class InfoResult(Result):
    lines: list[str] | None = None

    def report(self) -> list[str]:
        return list(self.lines or [])


@register("info", "model", InfoOptions)
def info(opts: InfoOptions, backbone: Backbone | None = None,
         progress: bool = False) -> InfoResult:
    """Load a model and print what diffgeo sees: kind, sizes, bottleneck shape, schedule."""
    if backbone is None:
        from diffgeo.backbones import load_backbone

        backbone = load_backbone(opts.model, device=opts.device, dtype=str(opts.dtype),
                                 allow_pickle=opts.allow_pickle)
    s = backbone.summary()
    lines = ([json.dumps(s.__dict__, indent=2, default=list)] if opts.as_json else s.lines())
    return InfoResult({"verb": "info", "summary": s.__dict__}, lines)


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Options):
    out: Path = option(Path("runs/model"), "Run folder (checkpoint/, model/, log).")
    data: str = option("scenes", "'scenes' (the built-in ground-truth scene set) or a folder of "
                       "images (cropped to the resolution).")
    preset: str = option("default-32", "U-Net shape: default-32, default-64, tiny-16.")
    resolution: int | None = option(None, "Override the preset's resolution.",
                                    check=at_least(1))
    steps: int = option(6000, "Total optimiser steps (a resumed run continues up to this "
                        "number).", check=at_least(1))
    batch_size: int = option(32, "Images per step.", check=at_least(1))
    lr: float = option(5e-4, "Peak learning rate (AdamW, warm-up then cosine).")
    warmup: int = option(200, "Linear warm-up steps.", check=at_least(0))
    min_snr_gamma: float = option(5.0, "min-SNR-γ loss weighting; 0 disables.",
                                  check=at_least(0))
    ema_decay: float = option(0.999, "EMA decay of the exported weights.")
    num_scenes: int = option(20000, "Training scenes drawn when --data scenes.",
                             check=at_least(1))
    checkpoint_every: int = option(250, "Steps between resumable checkpoints.",
                                   check=at_least(1))
    resume: str | None = option(None, "Checkpoint or model folder to continue from (e.g. "
                                "'default' to continue the shipped model). A run folder with a "
                                "checkpoint resumes by itself.")
    device: str = option("cpu", DEVICE_HELP)
    threads: int | None = option(None, "CPU threads (default: torch's choice).",
                                 check=at_least(1))
    seed: int = option(0, SEED_HELP)

    def validate(self) -> None:
        from diffgeo.train import MODEL_PRESETS

        if self.preset not in MODEL_PRESETS:
            raise InputError(f"preset must be one of {sorted(MODEL_PRESETS)}, got "
                             f"{self.preset!r}")


@dataclass
class TrainResult(Result):
    model: Path | None = None

    def report(self) -> list[str]:
        return [f"model written to {self.model}  (use --model {self.model})"]


@register("train", "model", TrainOptions)
def train(opts: TrainOptions, backbone: Backbone | None = None,
          progress: bool = False) -> TrainResult:
    """Train a pixel DDPM (UNet2DModel, linear betas 1e-4..0.02, T=1000) with EMA weights and
    resumable checkpoints; exports a folder that --model accepts."""
    from diffgeo.backbones.load import default_model_path
    from diffgeo.train import TrainConfig
    from diffgeo.train import train as run

    resume = str(default_model_path()) if opts.resume == "default" else opts.resume
    cfg = TrainConfig(out=str(opts.out), data=opts.data, preset=opts.preset,
                      resolution=opts.resolution, steps=opts.steps, batch_size=opts.batch_size,
                      lr=opts.lr, warmup_steps=opts.warmup,
                      min_snr_gamma=opts.min_snr_gamma or None, ema_decay=opts.ema_decay,
                      num_scenes=opts.num_scenes, checkpoint_every=opts.checkpoint_every,
                      resume=resume, device=opts.device, threads=opts.threads, seed=opts.seed)
    path = run(cfg, progress=progress)
    return TrainResult({"verb": "train", "options": opts.to_dict()}, Path(path))
