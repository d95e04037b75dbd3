"""``info`` and ``train``: what diffgeo sees in a model, and training one (model)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffgeo.verbs.options import (
    DEVICE_HELP,
    MODEL_HELP,
    SEED_HELP,
    ModelOptions,
    Options,
    at_least,
    meta_of,
    option,
)
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone
    from diffgeo.train import TrainConfig


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

        backbone = load_backbone(opts.model, **opts.load_kwargs(),
                                 allow_pickle=opts.allow_pickle)
    s = backbone.summary()
    lines = ([json.dumps(s.__dict__, indent=2, default=list)] if opts.as_json else s.lines())
    return InfoResult({"verb": "info", "summary": s.__dict__}, lines)


#: TrainConfig fields that the train verb offers under another name.
_CONFIG_NAMES = {"warmup": "warmup_steps"}


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Options):
    # Ranges are checked by diffgeo.train.check_config (see validate): the Python API's
    # TrainConfig goes through the same function, so the two can never disagree.
    out: Path = option(Path("runs/model"), "Run folder (checkpoint/, model/, log). A non-empty "
                       "folder that holds no training run is refused unless --force is given.")
    data: str = option("scenes", "'scenes' (the built-in ground-truth scene set) or a folder of "
                       "images (cropped to the resolution).")
    preset: str = option("default-32", "U-Net shape: default-32, default-64, tiny-16.")
    resolution: int | None = option(None, "Override the preset's resolution.")
    steps: int = option(6000, "Total optimiser steps (a resumed run continues up to this "
                        "number).")
    batch_size: int = option(32, "Images per step.")
    lr: float = option(5e-4, "Peak learning rate (AdamW, warm-up then cosine).")
    warmup: int = option(200, "Linear warm-up steps.")
    # 0 is this flag's spelling of "off" (TrainConfig's None), hence its own check here.
    min_snr_gamma: float = option(5.0, "min-SNR-γ loss weighting; 0 disables.",
                                  check=at_least(0))
    ema_decay: float = option(0.999, "EMA decay of the exported weights, in [0, 1).")
    num_scenes: int = option(20000, "Training scenes drawn when --data scenes.")
    checkpoint_every: int = option(250, "Steps between resumable checkpoints.")
    resume: str | None = option(None, "Checkpoint or model folder to continue from (e.g. "
                                "'default' to continue the shipped model). A run folder with a "
                                "checkpoint resumes by itself.")
    device: str = option("cpu", DEVICE_HELP)
    threads: int | None = option(None, "CPU threads (default: torch's choice).")
    seed: int = option(0, SEED_HELP)
    force: bool = option(False, "Train into a non-empty --out that holds no training run (only "
                         "checkpoint/, model/ and train_log.csv are written; nothing else there "
                         "is touched).")

    @classmethod
    def flags(cls) -> dict[str, str]:
        """TrainConfig field -> this verb's flag, for error messages."""
        return {_CONFIG_NAMES.get(f.name, f.name): meta_of(f).flag(f.name)
                for f in dataclasses.fields(cls)}

    def config(self) -> TrainConfig:
        from diffgeo.backbones.load import default_model_path
        from diffgeo.train import TrainConfig

        resume = str(default_model_path()) if self.resume == "default" else self.resume
        return TrainConfig(out=str(self.out), data=self.data, preset=self.preset,
                           resolution=self.resolution, steps=self.steps,
                           batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup,
                           min_snr_gamma=self.min_snr_gamma or None, ema_decay=self.ema_decay,
                           num_scenes=self.num_scenes, checkpoint_every=self.checkpoint_every,
                           resume=resume, device=self.device, threads=self.threads,
                           seed=self.seed, force=self.force)

    def validate(self) -> None:
        from diffgeo.train import check_config

        check_config(self.config(), self.flags())


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
    from diffgeo.train import train as run

    path = run(opts.config(), progress=progress, flags=opts.flags())
    return TrainResult({"verb": "train", "options": opts.to_dict()}, Path(path))
