"""``load_backbone``: one entry point for every model diffgeo runs on.

``name_or_path`` is ``"default"`` (the model that ships inside the package), a local folder saved
with ``save_pretrained`` (pipeline layout with ``model_index.json``, or a bare ``UNet2DModel``
folder with ``scheduler_config.json`` beside its ``config.json``, as google/ddpm-* use), or a
Hugging Face Hub id. Weights load from safetensors only unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from diffgeo.backbones.base import Backbone
from diffgeo.errors import InputError, ModelNotFoundError
from diffgeo.hub import looks_like_path, snapshot
from diffgeo.runtime import check_device, resolve_dtype
from diffgeo.schedule import GridRule, alphas_cumprod_from_config, read_scheduler_config

DEFAULT_MODEL = "default"

# Only what a pipeline needs: single-file checkpoints at an SD repo's root are several GB.
_HUB_PATTERNS = [
    "model_index.json", "config.json", "scheduler_config.json", "*/*.json", "*/*.txt",
    "*/merges.txt", "*/vocab.json", "*/spiece.model",
]


def default_model_path() -> Path:
    return Path(str(resources.files("diffgeo") / "assets" / "default-model"))


def _weights_present(folder: Path, allow_pickle: bool) -> bool:
    names = ("diffusion_pytorch_model.safetensors", "model.safetensors")
    pickles = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
    files = {p.name for p in folder.glob("*")}
    if any(n in files for n in names) or any(f.endswith(".safetensors") for f in files):
        return True
    return allow_pickle and any(n in files for n in pickles)


def _check_weights(folder: Path, allow_pickle: bool, what: str) -> None:
    if _weights_present(folder, allow_pickle):
        return
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.ckpt"))
    hint = (" It has only pickle weights (.bin): pass allow_pickle=True (CLI: --allow-pickle) "
            "if you trust its source." if has_pickle and not allow_pickle else "")
    raise ModelNotFoundError(f"model folder {folder} has no {what} weights "
                             f"(diffusion_pytorch_model.safetensors or model.safetensors).{hint}")


def _hub_download(repo_id: str, allow_pickle: bool, variant: str | None) -> Path:
    weights = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    patterns = list(_HUB_PATTERNS) + [f"*/{weights}.safetensors", f"{weights}.safetensors",
                                      "*/model.safetensors"]
    if allow_pickle:
        patterns += [f"*/{weights}.bin", f"{weights}.bin", "*/pytorch_model.bin"]
    return snapshot(repo_id, patterns)


def _resolve(name_or_path: str | os.PathLike, allow_pickle: bool, variant: str | None) -> Path:
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        path = default_model_path()
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the embedded default model is missing from this installation ({path}); "
                "reinstall diffgeo or train one with `diffgeo train` and pass its folder")
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model must be a folder, a hub id or 'default'; {path} is a file")
        return path
    if looks_like_path(name):
        raise ModelNotFoundError(f"model folder not found: {path}")
    return _hub_download(name, allow_pickle, variant)


def _schedule(sched_file: Path) -> tuple[str, torch.Tensor, GridRule]:
    """prediction type, float64 alpha_bar and grid rule of a scheduler config."""
    cfg = read_scheduler_config(sched_file)
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
        raise InputError(f"{sched_file}: prediction_type {pred!r} is not supported")
    try:
        rule = GridRule.from_config(cfg)
    except InputError as e:
        raise InputError(f"{sched_file}: {e}") from None
    return pred, alphas_cumprod_from_config(cfg), rule


def load_backbone(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str = "cpu",
                  dtype: torch.dtype | str = torch.float32, *, allow_pickle: bool = False,
                  variant: str | None = None, resolution: int | None = None) -> Backbone:
    """Load a pixel DDPM, a Stable Diffusion (1.x/2.x/XL) checkpoint or the default model."""
    bb, rule = _load_with_schedule(name_or_path, device, dtype, allow_pickle, variant,
                                   resolution)
    bb.grid_rule = rule
    return bb


def _load_with_schedule(name_or_path: str | os.PathLike, device: str, dtype: torch.dtype | str,
                        allow_pickle: bool, variant: str | None,
                        resolution: int | None) -> tuple[Backbone, GridRule]:
    dtype = resolve_dtype(dtype)
    check_device(device)
    path = _resolve(name_or_path, allow_pickle, variant)
    name = str(name_or_path)
    st = not allow_pickle
    kw = dict(use_safetensors=st, variant=variant, torch_dtype=dtype)

    index_file = path / "model_index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        sched_file = path / "scheduler" / "scheduler_config.json"
        pred, ac, rule = _schedule(sched_file)
        if "vae" in index:
            return _load_latent(path, index, pred, ac, name, device, dtype, kw, allow_pickle,
                                resolution), rule
        if "unet" not in index:
            raise InputError(f"{index_file} names no unet: not a diffusion pipeline folder")
        from diffusers import UNet2DModel

        _check_weights(path / "unet", allow_pickle, "unet")
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", **kw)
        from diffgeo.backbones.pixel import PixelBackbone

        return PixelBackbone(unet, ac, pred, name=name, device=device, dtype=dtype), rule

    cfg_file = path / "config.json"
    if cfg_file.is_file():
        cls = json.loads(cfg_file.read_text()).get("_class_name")
        if cls != "UNet2DModel":
            raise InputError(f"{cfg_file} describes a {cls}, expected a UNet2DModel (or a "
                             "pipeline folder with model_index.json)")
        sched_file = path / "scheduler_config.json"
        if not sched_file.is_file():
            raise ModelNotFoundError(f"{path} has a UNet2DModel but no scheduler_config.json: "
                                     "the noise schedule is unknown")
        _check_weights(path, allow_pickle, "UNet2DModel")
        from diffusers import UNet2DModel

        from diffgeo.backbones.pixel import PixelBackbone

        pred, ac, rule = _schedule(sched_file)
        unet = UNet2DModel.from_pretrained(path, **kw)
        return PixelBackbone(unet, ac, pred, name=name, device=device, dtype=dtype), rule
    raise ModelNotFoundError(f"{path} is not a model folder: it has neither model_index.json "
                             "nor config.json")


def _load_latent(path: Path, index: dict, pred: str, ac: torch.Tensor, name: str, device: str,
                 dtype: torch.dtype, kw: dict, allow_pickle: bool, resolution: int | None):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffgeo.backbones.latent import LatentBackbone

    for sub in ("unet", "vae"):
        _check_weights(path / sub, allow_pickle, sub)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    parts: dict = {}
    import transformers

    for enc_key, tok_key in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if enc_key in index and index[enc_key][0] is not None and (path / enc_key).is_dir():
            _check_weights(path / enc_key, allow_pickle, enc_key)
            cls = getattr(transformers, index[enc_key][1])
            parts[enc_key] = cls.from_pretrained(path / enc_key, dtype=dtype)
            tok_cls = getattr(transformers, index[tok_key][1])
            parts[tok_key] = tok_cls.from_pretrained(path / tok_key)
    return LatentBackbone(unet, vae, ac, prediction_type=pred, name=name, device=device,
                          dtype=dtype, resolution=resolution, **parts)
