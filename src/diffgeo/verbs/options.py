"""Typed verb options: one frozen dataclass per verb, its fields declared once with their help,
CLI flags, range checks and parsers; the CLI, batch and the Python API all build it.

A field's value may arrive as Python values (the API), click-converted strings (the CLI) or JSON
(a batch line, a settings.json): :func:`convert` brings each to the field's type in
``__post_init__``, so an ``Options`` object that exists is a valid one, and nothing is computed
before it exists. Enum fields take their value as a string: the error is ours (one line naming
the choices), not click's box.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from diffgeo.errors import InputError

MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Meta:
    """How one option is offered: help, flags (default ``--name-with-dashes``), positional."""

    help: str = ""
    flags: tuple[str, ...] = ()
    argument: bool = False
    parse: Callable[[Any, str], Any] | None = None  # raw (text or JSON) -> value, given the flag
    check: Callable[[Any, str], None] | None = None  # raises InputError naming the flag
    cli: bool = True  # offered on the command line (False: API and batch only)
    listed: bool = False  # a tuple given as one comma-separated value, not a repeated flag
    protect: bool = True  # a path option: results may never replace it (False: a folder the
    #                       verb writes into, such as the batch folder `evaluate` reports in)

    def flag(self, name: str) -> str:
        return self.flags[0].split("/")[0] if self.flags else "--" + name.replace("_", "-")


def option(default: Any = MISSING, help: str = "", *, flags: Sequence[str] = (),
           argument: bool = False, parse: Callable[[Any, str], Any] | None = None,
           check: Callable[[Any, str], None] | None = None, cli: bool = True,
           listed: bool = False, protect: bool = True) -> Any:
    """A dataclass field carrying its :class:`Meta`."""
    meta = {"option": Meta(help, tuple(flags), argument, parse, check, cli, listed, protect)}
    if isinstance(default, list):
        raise TypeError("use a tuple default for a repeatable option")
    return field(default=default, metadata=meta)


def meta_of(f: dataclasses.Field) -> Meta:
    return f.metadata.get("option", Meta())


# ----------------------------------------------------------------------------- choices
class Choice(str, enum.Enum):
    """A string choice; ``str(x)`` is its value, so it formats and serialises as the text."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls, raw: Any, name: str) -> Choice:
        if isinstance(raw, cls):
            return raw
        try:
            return cls(raw)
        except ValueError:
            raise InputError(f"{name} must be one of {'|'.join(c.value for c in cls)}, got "
                             f"{raw!r}") from None


class DType(Choice):
    float32 = "float32"
    float64 = "float64"
    float16 = "float16"
    bfloat16 = "bfloat16"

    @classmethod
    def _missing_(cls, value: object) -> DType | None:
        aliases = {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16",
                   "torch.float32": "float32", "torch.float64": "float64",
                   "torch.float16": "float16", "torch.bfloat16": "bfloat16"}
        return cls(aliases[value]) if value in aliases else None

    @property
    def half(self) -> bool:
        return self in (DType.float16, DType.bfloat16)


class FitMode(Choice):
    crop = "crop"
    pad = "pad"
    resize = "resize"


# ----------------------------------------------------------------------------- checks
def at_least(lo: float) -> Callable[[Any, str], None]:
    def check(v: Any, name: str) -> None:
        if v is not None and not v >= lo:
            raise InputError(f"{name} must be >= {lo:g}, got {v!r}")

    return check


def finite_above(lo: float) -> Callable[[Any, str], None]:
    def check(v: Any, name: str) -> None:
        if v is not None and not lo < v < float("inf"):
            raise InputError(f"{name} must be a finite number > {lo:g}, got {v!r}")

    return check


def in_range(lo: float, hi: float) -> Callable[[Any, str], None]:
    def check(v: Any, name: str) -> None:
        if v is not None and not lo < v <= hi:
            raise InputError(f"{name} must be in ({lo:g}, {hi:g}], got {v!r}")

    return check


# ----------------------------------------------------------------------------- parsers
def point(raw: Any, name: str) -> tuple[int, int]:
    """``"R,C"`` (CLI) or ``[R, C]`` (JSON)."""
    from diffgeo.io import parse_point

    if isinstance(raw, (list, tuple)):
        raw = ",".join(str(v) for v in raw)
    return parse_point(raw, name)


def box(raw: Any, name: str) -> tuple[int, int, int, int]:
    """``"r0,c0,r1,c1"`` (CLI) or ``[r0, c0, r1, c1]`` (JSON)."""
    from diffgeo.io import parse_box

    if isinstance(raw, (list, tuple)):
        raw = ",".join(str(v) for v in raw)
    return parse_box(raw, name)


def floats(raw: Any, name: str) -> tuple[float, ...]:
    """``"-30,0,30"`` (CLI) or ``[-30, 0, 30]`` (JSON)."""
    if isinstance(raw, (list, tuple)):
        vals: list[float] = []
        for v in raw:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                vals = []
                break
            vals.append(float(v))
    else:
        try:
            vals = [float(v) for v in str(raw).split(",") if v.strip()]
        except ValueError:
            vals = []
    if not vals:
        raise InputError(f"{name} must be comma-separated numbers like -30,0,30, got {raw!r}")
    return tuple(vals)


def int_pair(raw: Any, name: str) -> tuple[int, int]:
    """``"lo,hi"`` or ``[lo, hi]``: two integers."""
    vals = floats(raw, name)
    if len(vals) != 2 or any(v != int(v) for v in vals):
        raise InputError(f"{name} must be t_low,t_high, got {raw!r}")
    return int(vals[0]), int(vals[1])


def time_pair(raw: Any, name: str) -> tuple[int | float, int | float]:
    """``"lo,hi"`` or ``[lo, hi]``: two timesteps (integers; a flow model's may be
    fractional model times)."""
    vals = floats(raw, name)
    if len(vals) != 2:
        raise InputError(f"{name} must be t_low,t_high, got {raw!r}")
    return tuple(int(v) if v == int(v) else float(v) for v in vals)  # type: ignore[return-value]


def timestep(raw: Any, name: str) -> int | float:
    """A timestep option: an integer (DDPM grids), or a flow model's model time σ·T, which may
    be fractional (a flow grid takes the level nearest to the number given)."""
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = int(text)
        except ValueError:
            try:
                raw = float(text)
            except ValueError:
                raise InputError(f"{name} must be a timestep (a number), got {text!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InputError(f"{name} must be a timestep (a number), got {raw!r}")
    if not raw >= 0 or raw == float("inf"):
        raise InputError(f"{name} must be a timestep >= 0, got {raw!r}")
    return raw


# ----------------------------------------------------------------------------- conversion
def hint_shape(hint: Any) -> tuple[Any, bool, bool]:
    """(item type, may be None, repeatable) of a field's annotation."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[-1:] == (Ellipsis,):
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _scalar(tp: Any, raw: Any, name: str) -> Any:
    if isinstance(tp, type) and issubclass(tp, Choice):
        return tp.parse(raw, name)
    if tp is bool:
        if not isinstance(raw, bool):
            raise InputError(f"{name} must be true or false, got {raw!r}")
        return raw
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise InputError(f"{name} must be an integer, got {raw!r}")
        return raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise InputError(f"{name} must be a number, got {raw!r}")
        return float(raw)
    if tp is Path:
        if not isinstance(raw, (str, Path)):
            raise InputError(f"{name} must be a path, got {raw!r}")
        return Path(raw)
    if tp is str:
        if not isinstance(raw, str):
            raise InputError(f"{name} must be text, got {raw!r}")
        return raw
    return raw  # an already-parsed structure (points, boxes): its parser checked it


def convert(f: dataclasses.Field, hint: Any, raw: Any) -> Any:
    """``raw`` as the value of field ``f`` (annotation ``hint``), checked."""
    meta = meta_of(f)
    name = meta.flag(f.name)
    tp, optional, repeat = hint_shape(hint)
    repeat = repeat and not meta.listed
    if raw is None:
        if optional:
            return None
        raise InputError(f"{name} is required")
    if repeat:
        if isinstance(raw, (str, Path)) or not isinstance(raw, Sequence):
            raw = [raw]
        items = [meta.parse(r, name) if meta.parse else _scalar(tp, r, name) for r in raw]
        value: Any = tuple(items)
    else:
        value = meta.parse(raw, name) if meta.parse else _scalar(tp, raw, name)
    if meta.check is not None:
        for v in (value if repeat else (value,)):
            meta.check(v, name)
    return value


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every verb's options: converting and checking happen on construction."""

    #: Verbs whose options differentiate the model (derivatives need float32/float64).
    DIFFERENTIATES: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, convert(f, hints[f.name], getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Checks across fields (one field's own checks are in its declaration)."""

    def differentiates(self) -> bool:
        return self.DIFFERENTIATES

    def input_paths(self) -> list[Path]:
        """Every file or folder the options read (path options, a local model folder): what no
        result of the run may replace."""
        hints = typing.get_type_hints(type(self))
        found: list[Path] = []
        for f in dataclasses.fields(self):
            if f.name in RESERVED or not meta_of(f).protect:
                continue
            value = getattr(self, f.name)
            if hint_shape(hints[f.name])[0] is Path:
                found += [v for v in (value if isinstance(value, tuple) else (value,))
                          if isinstance(v, Path)]
            elif f.name == "model" and isinstance(value, str) and Path(value).exists():
                found.append(Path(value))
        return found

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> Options:
        """From a mapping (a batch line, settings.json's "options"): unknown and missing names
        are refused with the allowed ones named."""
        allowed = cls.names()
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            hints = [f"{u} (now {RENAMED[u]})" if RENAMED.get(u) in allowed else u
                     for u in unknown]
            raise InputError(f"unknown option(s) {', '.join(hints)} (allowed: "
                             f"{', '.join(sorted(n for n in allowed if n not in RESERVED))})")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is MISSING and f.name not in values]
        if missing:
            raise InputError(f"needs {', '.join(missing)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-able values (enums as text, paths as strings, tuples as lists),
        without out/force: what a settings.json records to run the verb again."""
        from diffgeo.io import to_jsonable

        return {f.name: to_jsonable(_plain(getattr(self, f.name)))
                for f in dataclasses.fields(self) if f.name not in RESERVED}


def _plain(v: Any) -> Any:
    if isinstance(v, Choice):
        return v.value
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


#: Set by whoever runs the verb (batch: the job's folder), never recorded as an option.
RESERVED = ("out", "force")

#: Old batch argument names (the Python names of the removed diffgeo.runs) and the options that
#: replaced them: a job line using one gets an error naming the new one.
RENAMED = {"num_steps": "steps", "pixels": "pixel", "rows": "row", "cols": "col",
           "exemplars": "exemplar", "maps": "map", "placements": "place",
           "strengths": "strength", "direction": "increase"}


# ----------------------------------------------------------------------------- shared options
MODEL_HELP = ("Model: 'default' (the small model shipped with diffgeo), a local folder saved with "
              "save_pretrained, or a Hugging Face Hub id such as google/ddpm-ema-celebahq-256.")
DEVICE_HELP = "Device to run on: cpu, cuda, cuda:1, mps."
DTYPE_HELP = ("Weights dtype: float32 (default), float64 (reference derivatives), float16/bfloat16 "
              "(GPU, forward passes only).")
FIT_HELP = ("How to bring an image of another size to the model's: crop (scale the short side, "
            "centre-crop), pad (scale the long side, pad with grey) or resize (distorts the "
            "aspect). Without it, a size mismatch is an error.")
FORCE_HELP = "Overwrite files that already exist in --out."
SEED_HELP = "Seed of every random draw (same seed, same output)."
STEPS_HELP = "DDIM steps over the full 0..T-1 range (the grid)."
PROMPT_HELP = "Text prompt (conditional models; empty by default)."
H_BLOCK_HELP = ("Flow-matching transformers (SD3, FLUX): the block whose image tokens are h, "
                "0-based over all blocks (FLUX: double- then single-stream); default the middle, "
                "n/2 - 1. `diffgeo info` names the block.")
GUIDANCE_HELP = ("FLUX's embedded guidance of guidance-distilled models (FLUX.1-dev; default "
                 "3.5); refused for models without a guidance embedding.")


@dataclass(frozen=True, kw_only=True)
class ModelOptions(Options):
    """A model to load, where and in what precision."""

    model: str = option("default", MODEL_HELP)
    device: str = option("cpu", DEVICE_HELP)
    dtype: DType = option(DType.float32, DTYPE_HELP)
    h_block: int | None = option(None, H_BLOCK_HELP, check=at_least(0))
    guidance: float | None = option(None, GUIDANCE_HELP, check=finite_above(0))

    def validate(self) -> None:
        super().validate()
        self.check_dtype(self.dtype)

    def load_kwargs(self) -> dict[str, Any]:
        """What ``load_backbone(self.model, **...)`` takes from these options (and what a
        loaded backbone is shared by: batch caches one per model and these)."""
        return dict(device=self.device, dtype=str(self.dtype), h_block=self.h_block,
                    guidance=self.guidance)

    def check_dtype(self, dtype: DType) -> None:
        """Derivatives need float32/float64 (DESIGN.md §2): half precision is refused for a
        verb that differentiates, whether asked for or the dtype of a backbone passed in."""
        if dtype.half and self.differentiates():
            raise InputError(f"--dtype {dtype} is for forward passes only: this verb "
                             "differentiates the model; use float32 or float64")


@dataclass(frozen=True, kw_only=True)
class ImageVerbOptions(ModelOptions):
    """A verb over an image file that writes a result folder."""

    steps: int = option(50, STEPS_HELP, check=at_least(1))
    prompt: str = option("", PROMPT_HELP)
    fit: FitMode | None = option(None, FIT_HELP)
    out: Path | None = option(None, "Output folder.")
    force: bool = option(False, FORCE_HELP)
    max_memory: float | None = option(None, "Refuse a run estimated to need more than this many "
                                      "GiB at once (default: 80% of the device's memory).",
                                      check=finite_above(0))


@dataclass(frozen=True, kw_only=True)
class Seeded:
    """Mixed into the options of verbs that draw random numbers (and only those)."""

    seed: int = option(0, SEED_HELP)
