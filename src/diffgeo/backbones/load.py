"""``load_backbone``: one entry point for every model diffgeo runs on.

``name_or_path`` is ``"default"`` (the model that ships inside the package), a local folder saved
with ``save_pretrained`` (pipeline layout with ``model_index.json``, or a bare ``UNet2DModel``
folder with ``scheduler_config.json`` beside its ``config.json``, as google/ddpm-* use), or a
Hugging Face Hub id. Weights load from safetensors only unless ``allow_pickle=True``.

A broken folder is reported as one :class:`InputError` or :class:`ModelNotFoundError` naming the
file and what is wrong with it. The files are checked before diffusers or transformers read them
(JSON syntax, the safetensors header, tensor names and shapes against an empty model built from
the config on the meta device): their own errors for the same faults name neither the file nor
the cause ("Unable to load weights", "Cannot copy out of meta tensor").
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from diffgeo.backbones.base import Backbone
from diffgeo.errors import InputError, ModelNotFoundError
from diffgeo.hub import looks_like_path, snapshot
from diffgeo.runtime import check_device, resolve_dtype
from diffgeo.schedule import GridRule, alphas_cumprod_from_config

DEFAULT_MODEL = "default"

# Only what a pipeline needs: single-file checkpoints at an SD repo's root are several GB.
_HUB_PATTERNS = [
    "model_index.json", "config.json", "scheduler_config.json", "*/*.json", "*/*.txt",
    "*/merges.txt", "*/vocab.json", "*/spiece.model",
]

# The weight file names from_pretrained reads (safetensors, then pickle), per library.
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def default_model_path() -> Path:
    return Path(str(resources.files("diffgeo") / "assets" / "default-model"))


# ------------------------------------------------------------------------------ reading files
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def read_json_file(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """The JSON object in ``path``; an :class:`InputError` naming the file and what is wrong
    (unreadable, not UTF-8, a syntax error with its line and column, not an object)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text (a binary file?)") from None
    except OSError as e:
        raise InputError(f"{what} {path} could not be read: {e.strerror or e}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                         f"column {e.colno}") from None
    if not isinstance(value, dict):
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        raise InputError(f"{what} {path} holds a JSON {kind}, expected an object ({{...}})")
    return value


def _safetensors_fault(path: Path, error: Exception) -> str:
    """What a safetensors file's header error means. safetensors' own wording ("header too
    large", "incomplete metadata") varies across versions and does not say truncated vs
    corrupt, so the cause is read off the file itself."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= size - 8 else b""
    except OSError:
        return f"is not a readable safetensors file ({error})"
    if head.startswith(b"version "):
        return "is a Git LFS pointer, not the weights: fetch them with `git lfs pull`"
    if size == 0:
        return "is empty (0 bytes)"
    if n < 0:
        return f"is {size} bytes: too short to be a safetensors file"
    if not raw:
        return ("is not a safetensors file: its first 8 bytes give a header longer than the "
                "file (corrupt, or another format)")
    try:
        header = json.loads(raw)
        data = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                   default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "has a corrupt safetensors header"
    need = 8 + n + data
    if size < need:
        return (f"is truncated: {size} bytes, its header needs {need} (an interrupted download "
                "or copy?)")
    if size > need:
        return f"is corrupt: {size - need} bytes beyond the tensor data its header describes"
    return f"is not a valid safetensors file ({error})"


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header alone; a corrupt,
    truncated or unreadable file is an :class:`InputError` naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise InputError(f"{path} {_safetensors_fault(path, e)}") from None
    except OSError as e:
        raise InputError(f"{path} could not be read: {e.strerror or e}") from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU), its faults as in :func:`read_safetensors_shapes`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    read_safetensors_shapes(path)
    try:
        return load_file(str(path))
    except SafetensorError as e:  # the header was sound: the tensor data is not
        raise InputError(f"{path} {_safetensors_fault(path, e)}") from None
    except OSError as e:
        raise InputError(f"{path} could not be read: {e.strerror or e}") from None


def _pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    # map_location="meta" reads the shapes without the tensor data.
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): "
                         f"{first}") from None
    except OSError as e:
        raise InputError(f"{path} could not be read: {e.strerror or e}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------ weights
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


def _with_variant(name: str, variant: str | None) -> str:
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}" if variant else name


def _weight_files(folder: Path, names: tuple[str, str], variant: str | None,
                  allow_pickle: bool) -> list[Path]:
    """The file(s) from_pretrained will read, in its order: safetensors, then (only with
    ``allow_pickle``) the pickle; a file or a sharded index of shards."""
    for name in names[: 2 if allow_pickle else 1]:
        single = folder / _with_variant(name, variant)
        if single.exists() and not single.is_file():
            raise InputError(f"{single} is a folder, not a weights file")
        if single.is_file():
            return [single]
        # diffusers puts the variant before .json: x.safetensors.index.fp16.json
        index_file = folder / _with_variant(name + ".index.json", variant)
        if index_file.is_file():
            weight_map = read_json_file(index_file, "weights index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"weights index {index_file} has no weight_map")
            shards = [folder / str(s) for s in sorted(set(map(str, weight_map.values())))]
            for shard in shards:
                if not shard.is_file():
                    raise ModelNotFoundError(f"weights index {index_file} lists {shard.name}, "
                                             f"which is not in {folder}")
            return shards
    wanted = _with_variant(names[0], variant)
    raise ModelNotFoundError(f"{folder} has no {wanted}: that is the weights file "
                             "from_pretrained reads" + (f" (variant {variant!r})" if variant
                                                        else ""))


def _file_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(read_safetensors_shapes(f) if f.suffix == ".safetensors"
                      else _pickle_shapes(f))
    return shapes


def _empty_model(build: Callable[[], torch.nn.Module], cfg_file: Path,
                 cls_name: str) -> torch.nn.Module:
    """The model a config describes, on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            return build()
    except (TypeError, ValueError) as e:
        # What the diffusers / transformers constructors raise for a config value they reject
        # (an unknown block type, lists of different lengths, a string for a number).
        raise InputError(f"{cfg_file} does not describe a valid {cls_name}: {e}") from None


def _check_tensors(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]],
                   files: list[Path], cfg_file: Path, complete: bool) -> None:
    """The weights' tensors against the model ``cfg_file`` describes: same shapes, and with
    ``complete`` every tensor present (diffusers leaves a missing one on the meta device and
    fails on first use; transformers initialises it at random, with a warning)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    where = str(files[0]) if len(files) == 1 else f"the weights in {files[0].parent}"
    bad = [(k, shapes[k], s) for k, s in expected.items() if k in shapes and shapes[k] != s]
    if bad:
        k, got, want = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise InputError(f"{where} does not match {cfg_file}: {k} has shape {list(got)} in the "
                         f"weights but {list(want)} in the model the config describes{more}; "
                         "the weights and the config come from different models")
    missing = sorted(set(expected) - set(shapes))
    if missing and (complete or len(missing) == len(expected)):
        raise InputError(f"{where} lacks {len(missing)} of the {len(expected)} tensors "
                         f"{cfg_file} describes, e.g. {missing[0]}: incomplete weights, or "
                         "the weights of another model")


# ------------------------------------------------------------------------------ configs
def _part_config(folder: Path, expected: str, what: str) -> tuple[Path, dict[str, Any]]:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"{cfg_file} is missing: the {what} needs the config.json "
                                 "that save_pretrained writes")
    cfg = read_json_file(cfg_file, f"{what} config")
    cls = cfg.get("_class_name")
    if cls is not None and cls != expected:
        raise InputError(f"{cfg_file} describes a {cls}, expected a {expected}")
    return cfg_file, cfg


def _check_sample_size(cfg: dict[str, Any], cfg_file: Path) -> None:
    size = cfg.get("sample_size")
    if size is None:
        raise InputError(f"{cfg_file} has no sample_size: the image size the model works at is "
                         "unknown")
    sizes = size if isinstance(size, list) and len(size) == 2 else [size]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise InputError(f"{cfg_file}: sample_size must be a positive integer or a pair of "
                         f"them, got {size!r}")


def _index_entry(index: dict[str, Any], key: str, index_file: Path) -> str | None:
    """The class model_index.json gives component ``key`` (None: absent or [null, null])."""
    entry = index.get(key)
    if entry is None:
        return None
    if (not isinstance(entry, list) or len(entry) != 2
            or not all(e is None or isinstance(e, str) for e in entry)):
        raise InputError(f"{index_file}: {key!r} must be [library, class name] as "
                         f"save_pretrained writes it, got {entry!r}")
    return entry[1]


def _expect_class(found: str | None, expected: str, key: str, index_file: Path) -> None:
    if found != expected:
        raise InputError(f"{index_file} gives {key} as {found!r}; diffgeo loads a {expected} "
                         "there (pixel DDPM pipelines and Stable Diffusion 1.x/2.x/XL)")


def _check_channels(config: Any, cfg_file: Path, latent: bool) -> None:
    i, o = config.in_channels, config.out_channels
    if o == i:
        return
    if o == 2 * i and latent:
        raise InputError(f"{cfg_file}: out_channels {o} is twice in_channels {i}: a "
                         "learned-variance latent model, not supported yet (issue 19)")
    if o != 2 * i:
        raise InputError(f"{cfg_file}: out_channels {o} with in_channels {i}: diffgeo needs a "
                         "network predicting ε (as many channels as its input), or ε and a "
                         "learned variance (twice as many)")


_SCHEDULE_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "num_train_timesteps": ((int,), "an integer"),
    "beta_start": ((int, float), "a number"),
    "beta_end": ((int, float), "a number"),
    "beta_schedule": ((str,), "a string"),
    "trained_betas": ((list,), "a list of numbers"),
    "prediction_type": ((str,), "a string"),
    "timestep_spacing": ((str,), "a string"),
    "steps_offset": ((int,), "an integer"),
    "set_alpha_to_one": ((bool,), "true or false"),
    "rescale_betas_zero_snr": ((bool,), "true or false"),
}
# null is what save_pretrained writes for these when unset; the others have no null meaning.
_NULLABLE = ("trained_betas", "steps_offset", "rescale_betas_zero_snr")


def _schedule(sched_file: Path) -> tuple[str, torch.Tensor, GridRule]:
    """prediction type, float64 alpha_bar and grid rule of a scheduler config."""
    if not sched_file.is_file():
        raise ModelNotFoundError(f"scheduler config not found: {sched_file}")
    return _schedule_config(read_json_file(sched_file, "scheduler config"), str(sched_file))


def _schedule_config(cfg: dict[str, Any], sched_file: str) -> tuple[str, torch.Tensor, GridRule]:
    for name, (types, kind) in _SCHEDULE_FIELDS.items():
        if name not in cfg or (cfg[name] is None and name in _NULLABLE):
            continue
        value = cfg[name]
        # bool is an int to Python, but `"num_train_timesteps": true` is a broken config.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise InputError(f"{sched_file}: {name} must be {kind}, got {json.dumps(value)}")
    betas = cfg.get("trained_betas")
    if betas is not None and not all(isinstance(b, int | float) and not isinstance(b, bool)
                                     for b in betas):
        raise InputError(f"{sched_file}: trained_betas must be a list of numbers")
    if betas is None and int(cfg.get("num_train_timesteps") or 1000) < 2:
        raise InputError(f"{sched_file}: num_train_timesteps must be >= 2, "
                         f"got {cfg['num_train_timesteps']}")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
        raise InputError(f"{sched_file}: prediction_type {pred!r} is not supported")
    try:
        rule = GridRule.from_config(cfg)
        ac = alphas_cumprod_from_config(cfg)
    except InputError as e:
        raise InputError(f"{sched_file}: {e}") from None
    if len(ac) < 2 or not bool(torch.isfinite(ac).all() and (ac > 0).all() and (ac <= 1).all()):
        raise InputError(f"{sched_file}: its betas give alpha_bar outside (0, 1]: check "
                         "beta_start, beta_end and trained_betas")
    return pred, ac, rule


# ------------------------------------------------------------------------------ loading
def _hub_download(repo_id: str, allow_pickle: bool, variant: str | None) -> Path:
    weights = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    # sharded files (SD3/FLUX transformers, T5) are name-NNNNN-of-NNNNN.safetensors
    patterns = list(_HUB_PATTERNS) + [f"*/{weights}.safetensors", f"{weights}.safetensors",
                                      "*/model.safetensors", f"*/{weights}-*.safetensors",
                                      "*/model-*.safetensors"]
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


def load_backbone(name_or_path: Any = DEFAULT_MODEL, device: str | None = None,
                  dtype: torch.dtype | str | None = None, *, allow_pickle: bool = False,
                  variant: str | None = None, resolution: int | None = None,
                  h_block: int | None = None, guidance: float | None = None) -> Backbone:
    """Load a pixel DDPM, a Stable Diffusion (1.x/2.x/XL), SD3/SD3.5 or FLUX.1 checkpoint
    (folder or hub id) or the default model — or wrap an already-loaded diffusers pipeline of
    any of these families, using its modules as they are (``device`` / ``dtype`` default to
    the pipeline's; folders and hub ids default to cpu / float32).

    Flow-matching transformers only: ``h_block`` is the block whose image tokens are h (default
    n/2 − 1), ``guidance`` FLUX's embedded guidance of guidance-distilled models (default 3.5).
    Both are checked against the model's configs before any weights are read, and refused for
    U-Net models (and ``guidance`` for a transformer without ``guidance_embeds``).

    A pixel network that outputs twice its input's channels predicts ε and a learned variance
    (improved DDPM); its first half is used as ε (DDIM never uses the variance)."""
    from diffusers import DiffusionPipeline

    if isinstance(name_or_path, DiffusionPipeline):
        return backbone_from_pipeline(name_or_path, device=device, dtype=dtype,
                                      resolution=resolution, h_block=h_block,
                                      guidance=guidance)
    device = "cpu" if device is None else device
    dtype = torch.float32 if dtype is None else dtype
    flow = FlowOptions(h_block, guidance)
    bb, rule = _load_with_schedule(name_or_path, device, dtype, allow_pickle, variant,
                                   resolution, flow)
    bb.grid_rule = rule
    return bb


def _diffusers_part(cls: Any, root: Path, sub: str | None, kw: dict, allow_pickle: bool,
                    variant: str | None, what: str,
                    check: Callable[[Any, Path, dict], None] | None = None) -> Any:
    """``cls.from_pretrained`` of ``root/sub``, after checking its config and weights."""
    folder = root / sub if sub else root
    cfg_file, cfg = _part_config(folder, cls.__name__, what)
    _check_weights(folder, allow_pickle, what)
    files = _weight_files(folder, _DIFFUSERS_WEIGHTS, variant, allow_pickle)
    shapes = _file_shapes(files)
    model = _empty_model(lambda: cls.from_config(cfg), cfg_file, cls.__name__)
    if check is not None:
        check(model.config, cfg_file, cfg)
    fix = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix is not None and len(files) == 1:
        fix(shapes)  # old checkpoints' attention names, renamed as from_pretrained renames them
    _check_tensors(model, shapes, files, cfg_file, complete=True)
    return cls.from_pretrained(root, subfolder=sub, **kw) if sub else cls.from_pretrained(
        root, **kw)


def _transformers_part(cls: Any, folder: Path, dtype: torch.dtype, allow_pickle: bool,
                       what: str) -> Any:
    cfg_file, cfg = _part_config(folder, cls.__name__, what)
    _check_weights(folder, allow_pickle, what)
    files = _weight_files(folder, _TRANSFORMERS_WEIGHTS, None, allow_pickle)
    shapes = _file_shapes(files)
    model = _empty_model(lambda: cls(cls.config_class.from_dict(cfg)), cfg_file, cls.__name__)
    _check_tensors(model, shapes, files, cfg_file, complete=False)
    return cls.from_pretrained(folder, dtype=dtype, use_safetensors=None if allow_pickle else True)


def _tokenizer(cls: Any, folder: Path, index_file: Path, key: str) -> Any:
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} is missing: {index_file} names a {key}")
    for f in sorted(folder.glob("*.json")):  # transformers' JSONDecodeError names no file
        read_json_file(f, f"{key} file")
    return cls.from_pretrained(folder)


def _load_with_schedule(name_or_path: str | os.PathLike, device: str, dtype: torch.dtype | str,
                        allow_pickle: bool, variant: str | None, resolution: int | None,
                        flow: FlowOptions) -> tuple[Backbone, Any]:
    dtype = resolve_dtype(dtype)
    check_device(device)
    path = _resolve(name_or_path, allow_pickle, variant)
    name = str(name_or_path)
    # None lets diffusers fall back to the pickle when there is no safetensors file.
    kw = dict(use_safetensors=None if allow_pickle else True, variant=variant,
              torch_dtype=dtype)

    index_file = path / "model_index.json"
    if index_file.is_file():
        index = read_json_file(index_file, "pipeline index")
        if index.get("_class_name") in FLOW_PIPELINES:
            bb = _load_flow(path, index, index_file, name, device, dtype, kw, allow_pickle,
                            variant, resolution, flow)
            return bb, bb.grid_rule
        flow.refuse(name)
        unet_cls = _index_entry(index, "unet", index_file)
        vae_cls = _index_entry(index, "vae", index_file)
        sched_file = path / "scheduler" / "scheduler_config.json"
        if unet_cls is None:
            raise InputError(f"{index_file} names no unet: not a diffusion pipeline folder")
        pred, ac, rule = _schedule(sched_file)
        if vae_cls is not None:
            _expect_class(unet_cls, "UNet2DConditionModel", "unet", index_file)
            _expect_class(vae_cls, "AutoencoderKL", "vae", index_file)
            return _load_latent(path, index, index_file, pred, ac, name, device, dtype, kw,
                                allow_pickle, variant, resolution), rule
        _expect_class(unet_cls, "UNet2DModel", "unet", index_file)
        from diffusers import UNet2DModel

        unet = _diffusers_part(UNet2DModel, path, "unet", kw, allow_pickle, variant, "unet",
                               _pixel_check)
        from diffgeo.backbones.pixel import PixelBackbone

        return PixelBackbone(unet, ac, pred, name=name, device=device, dtype=dtype), rule

    cfg_file = path / "config.json"
    if cfg_file.is_file():
        cls = read_json_file(cfg_file, "model config").get("_class_name")
        if cls != "UNet2DModel":
            what = "has no _class_name" if cls is None else f"describes a {cls}"
            raise InputError(f"{cfg_file} {what}, expected a UNet2DModel (or a pipeline folder "
                             "with model_index.json)")
        sched_file = path / "scheduler_config.json"
        if not sched_file.is_file():
            raise ModelNotFoundError(f"{path} has a UNet2DModel but no scheduler_config.json: "
                                     "the noise schedule is unknown")
        from diffusers import UNet2DModel

        from diffgeo.backbones.pixel import PixelBackbone

        flow.refuse(name)
        pred, ac, rule = _schedule(sched_file)
        unet = _diffusers_part(UNet2DModel, path, None, kw, allow_pickle, variant,
                               "UNet2DModel", _pixel_check)
        return PixelBackbone(unet, ac, pred, name=name, device=device, dtype=dtype), rule
    raise ModelNotFoundError(f"{path} is not a model folder: it has neither model_index.json "
                             "nor config.json")


@dataclass(frozen=True)
class FlowOptions:
    """What only flow-matching transformers take when loaded: the h block and FLUX's embedded
    guidance (:func:`load_backbone`'s ``h_block`` / ``guidance``; None: the model's default)."""

    h_block: int | None = None
    guidance: float | None = None

    def refuse(self, name: str) -> None:
        """Refuse them for a U-Net model (before its weights are read)."""
        given = [f"{k} (--{k.replace('_', '-')})" for k in ("h_block", "guidance")
                 if getattr(self, k) is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise InputError(f"{' and '.join(given)} {verb} to flow-matching transformers (SD3, "
                             f"FLUX) only; the model {name} is a U-Net")

    def check(self, config: Any, family: str, name: str) -> None:
        """Check them against a transformer's config (the meta model's: defaults filled in)."""
        from diffgeo.backbones.flow import check_guidance, check_h_block

        if self.h_block is not None:
            check_h_block(self.h_block, _flow_backbone(family).num_blocks_of(config))
        check_guidance(self.guidance, bool(getattr(config, "guidance_embeds", False)), name)

    def backbone_kwargs(self, family: str) -> dict[str, Any]:
        kw: dict[str, Any] = {"h_block": self.h_block}
        if family == "FluxPipeline":
            kw["guidance"] = self.guidance
        return kw


def _flow_backbone(pipe_name: str) -> Any:
    if pipe_name == "FluxPipeline":
        from diffgeo.backbones.flux import FluxBackbone

        return FluxBackbone
    from diffgeo.backbones.sd3 import SD3Backbone

    return SD3Backbone


#: pipeline class -> (transformer class, text encoder slots (encoder, tokenizer, required))
FLOW_PIPELINES: dict[str, tuple[str, tuple[tuple[str, str, bool], ...]]] = {
    "StableDiffusion3Pipeline": ("SD3Transformer2DModel", (
        ("text_encoder", "tokenizer", True), ("text_encoder_2", "tokenizer_2", True),
        ("text_encoder_3", "tokenizer_3", False))),
    "FluxPipeline": ("FluxTransformer2DModel", (
        ("text_encoder", "tokenizer", True), ("text_encoder_2", "tokenizer_2", True))),
}


def _load_flow(path: Path, index: dict, index_file: Path, name: str, device: str,
               dtype: torch.dtype, kw: dict, allow_pickle: bool, variant: str | None,
               resolution: int | None, flow: FlowOptions) -> Backbone:
    """An SD3 or FLUX pipeline folder: every part checked as the U-Net folders' are, then
    assembled into the diffusers pipeline class the index names (so prompt encoding is the
    pipeline's own) and wrapped."""
    import diffusers

    pipe_name = index["_class_name"]
    tr_name, slots = FLOW_PIPELINES[pipe_name]
    _expect_class(_index_entry(index, "transformer", index_file), tr_name, "transformer",
                  index_file)
    _expect_class(_index_entry(index, "vae", index_file), "AutoencoderKL", "vae", index_file)
    _expect_class(_index_entry(index, "scheduler", index_file),
                  "FlowMatchEulerDiscreteScheduler", "scheduler", index_file)
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise ModelNotFoundError(f"scheduler config not found: {sched_file}")
    read_json_file(sched_file, "scheduler config")
    parts: dict[str, Any] = {
        # the flow options checked on the transformer's config, before any weights are read
        "transformer": _diffusers_part(
            getattr(diffusers, tr_name), path, "transformer", kw, allow_pickle, variant,
            "transformer", lambda config, cfg_file, cfg: flow.check(config, pipe_name, name)),
        "vae": _diffusers_part(diffusers.AutoencoderKL, path, "vae", kw, allow_pickle, variant,
                               "vae"),
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
            path, subfolder="scheduler"),
    }
    for enc_key, tok_key, required in slots:
        text = _text_parts(path, index, index_file, enc_key, tok_key, dtype, allow_pickle)
        if text is None and required:
            raise ModelNotFoundError(f"{index_file}: a {pipe_name} needs its {enc_key} "
                                     f"({path / enc_key} is missing)")
        parts.update(text or {enc_key: None, tok_key: None})
    pipe_cls = getattr(diffusers, pipe_name)
    optional = {k: None for k in getattr(pipe_cls, "_optional_components", []) if k not in parts}
    return backbone_from_pipeline(pipe_cls(**parts, **optional), device=device, dtype=dtype,
                                  resolution=resolution, name=name, h_block=flow.h_block,
                                  guidance=flow.guidance)


def _text_parts(path: Path, index: dict, index_file: Path, enc_key: str, tok_key: str,
                dtype: torch.dtype, allow_pickle: bool) -> dict[str, Any] | None:
    """A text encoder and its tokenizer as model_index.json names them (None: no encoder in
    the index or no folder for it), every file checked first."""
    import transformers

    enc_name = _index_entry(index, enc_key, index_file)
    if enc_name is None or not (path / enc_key).is_dir():
        return None
    tok_name = _index_entry(index, tok_key, index_file)
    if tok_name is None:
        raise InputError(f"{index_file} names a {enc_key} but no {tok_key}")
    classes = []
    for key, cls_name in ((enc_key, enc_name), (tok_key, tok_name)):
        cls = getattr(transformers, cls_name, None)
        if not hasattr(cls, "from_pretrained"):
            raise InputError(f"{index_file} gives {key} as {cls_name!r}, which is not a "
                             f"class of transformers {transformers.__version__}")
        classes.append(cls)
    return {enc_key: _transformers_part(classes[0], path / enc_key, dtype, allow_pickle,
                                        enc_key),
            tok_key: _tokenizer(classes[1], path / tok_key, index_file, tok_key)}


def backbone_from_pipeline(pipe: Any, *, device: str | None = None,
                           dtype: torch.dtype | str | None = None,
                           resolution: int | None = None, name: str = "",
                           h_block: int | None = None,
                           guidance: float | None = None) -> Backbone:
    """A backbone over an already-loaded diffusers pipeline's own modules (SD3, FLUX, SD/SDXL,
    pixel DDPM). ``device`` / ``dtype`` default to the pipeline's; modules are moved and cast
    in place when they differ (a pipeline object is the caller's: say so in the docs).
    ``h_block`` / ``guidance`` as in :func:`load_backbone`."""
    cls = type(pipe).__name__
    first = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if first is None:
        raise InputError(f"a {cls} has neither a transformer nor a unet: not a supported "
                         "diffusion pipeline")
    p = next(first.parameters())
    dev = str(p.device) if device is None else device
    dt = p.dtype if dtype is None else resolve_dtype(dtype)
    check_device(dev)
    name = name or getattr(getattr(pipe, "config", None), "_name_or_path", "") or cls
    flow = FlowOptions(h_block, guidance)
    family = cls if cls in FLOW_PIPELINES else (
        "StableDiffusion3Pipeline" if hasattr(pipe, "text_encoder_3") else None)
    if family is not None:
        flow.check(first.config, family, name)
        return _flow_backbone(family)(pipe, name=name, device=dev, dtype=dt,
                                      resolution=resolution, **flow.backbone_kwargs(family))
    flow.refuse(name)
    cfg = dict(pipe.scheduler.config)
    pred, ac, rule = _schedule_config(cfg, f"{cls}.scheduler")
    if getattr(pipe, "vae", None) is not None and getattr(pipe, "unet", None) is not None:
        from diffgeo.backbones.latent import LatentBackbone

        extra = {k: getattr(pipe, k, None) for k in ("text_encoder", "tokenizer",
                                                     "text_encoder_2", "tokenizer_2")}
        bb: Backbone = LatentBackbone(pipe.unet, pipe.vae, ac, prediction_type=pred, name=name,
                                      device=dev, dtype=dt, resolution=resolution, **extra)
    elif getattr(pipe, "unet", None) is not None:
        from diffgeo.backbones.pixel import PixelBackbone

        bb = PixelBackbone(pipe.unet, ac, pred, name=name, device=dev, dtype=dt)
    else:
        raise InputError(f"a {cls} is not a supported pipeline (SD3, FLUX, Stable Diffusion, "
                         "SDXL or a pixel DDPM)")
    bb.grid_rule = rule
    return bb


def _pixel_check(config: Any, cfg_file: Path, cfg: dict) -> None:
    _check_sample_size(cfg, cfg_file)
    _check_channels(config, cfg_file, latent=False)


def _load_latent(path: Path, index: dict, index_file: Path, pred: str, ac: torch.Tensor,
                 name: str, device: str, dtype: torch.dtype, kw: dict, allow_pickle: bool,
                 variant: str | None, resolution: int | None):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffgeo.backbones.latent import LatentBackbone

    def unet_check(config: Any, cfg_file: Path, cfg: dict) -> None:
        if resolution is None:  # otherwise the resolution sets the latent size
            _check_sample_size(cfg, cfg_file)
        _check_channels(config, cfg_file, latent=True)

    unet = _diffusers_part(UNet2DConditionModel, path, "unet", kw, allow_pickle, variant,
                           "unet", unet_check)
    vae = _diffusers_part(AutoencoderKL, path, "vae", kw, allow_pickle, variant, "vae")
    parts: dict = {}
    for enc_key, tok_key in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        parts.update(_text_parts(path, index, index_file, enc_key, tok_key, dtype,
                                 allow_pickle) or {})
    return LatentBackbone(unet, vae, ac, prediction_type=pred, name=name, device=device,
                          dtype=dtype, resolution=resolution, **parts)
