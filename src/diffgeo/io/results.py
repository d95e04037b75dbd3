"""Result folders: written whole, never over the user's files, JSON that stays valid.

:class:`ResultDir` refuses to overwrite existing files unless forced, never overwrites the
user's inputs, and writes every file atomically; :func:`to_jsonable` turns settings into plain
JSON types.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import enum
import io as _io
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from diffgeo.errors import (
    InputError,
    NonFiniteError,
    OutputError,
    OutputExistsError,
    check_finite,
)
from diffgeo.io.images import PathLike, tensor_to_numpy, to_uint8

#: Tensors / arrays with at most this many elements are written to JSON in full.
_JSON_MAX_ELEMENTS = 1024

# --------------------------------------------------------------------------------------------
# JSON conversion
# --------------------------------------------------------------------------------------------


def _json_float(v: float) -> float | str:
    # JSON has no inf/NaN; keep the information as a string rather than writing invalid JSON.
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _array_summary(arr: np.ndarray) -> Any:
    if arr.size <= _JSON_MAX_ELEMENTS:
        return to_jsonable(arr.tolist())
    summary: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    if np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        a = arr.astype(np.float64)
        for key, fn in (("min", np.min), ("max", np.max), ("mean", np.mean)):
            summary[key] = _json_float(float(fn(a)))
    return summary


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types.

    Dataclasses -> dicts (objects with ``to_dict()`` use it), Paths -> str, tuples / sets ->
    lists, numpy scalars -> Python numbers, arrays and tensors with at most 1024 elements ->
    nested lists (larger ones -> a summary with shape, dtype, min, max, mean), torch dtype /
    device -> str, enums -> their value, inf / NaN -> "inf" / "-inf" / "nan".
    """
    if obj is None or isinstance(obj, (bool, str, int)) and not isinstance(obj, enum.Enum):
        return obj
    if isinstance(obj, float):
        return _json_float(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (os.PathLike,)):
        return os.fspath(obj)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, torch.Tensor):
        return _array_summary(tensor_to_numpy(obj))
    if isinstance(obj, np.ndarray):
        return _array_summary(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and not isinstance(obj, type):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot convert an object of type {type(obj).__name__} to JSON: {obj!r}")


def _csv_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise InputError(f"CSV cells must be scalars; got a tensor of shape {tuple(v.shape)}")
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


# --------------------------------------------------------------------------------------------
# Result folder
# --------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(target: Path, folder: Path) -> bool:
    """``target`` lies in the folder ``folder`` (both resolved: links and ``..`` seen through)."""
    try:
        return folder.is_dir() and target.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def atomic_write(target: Path, writer: Callable[[IO[Any]], None] | str,
                 text: bool = False) -> Path:
    """Write ``target`` through a uniquely named temporary file in its folder, fsync and rename:
    readers see the old file or the whole new one, never a partial write (a crash leaves no
    temporary behind either). The rename replaces a symlink at ``target`` rather than writing
    through it. ``writer`` writes to the open file, or is the text itself."""
    if isinstance(writer, str):
        content, text = writer, True
        writer = lambda f: f.write(content)  # noqa: E731
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        kwargs: dict[str, Any] = {"encoding": "utf-8", "newline": ""} if text else {}
        with os.fdopen(fd, "w" if text else "wb", **kwargs) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# --------------------------------------------------------------------------------------------
# Runs: results appear whole or not at all
# --------------------------------------------------------------------------------------------


@dataclass
class RunScope:
    """One verb run: its name (for messages), the user's input paths no result may replace, and
    the result folders opened during it, committed when it returns and discarded if it fails."""

    label: str
    protect: list[Path]
    folders: list[ResultDir] = dataclasses.field(default_factory=list)


_SCOPE: contextvars.ContextVar[RunScope | None] = contextvars.ContextVar("diffgeo_run",
                                                                         default=None)

#: Prefix of the hidden folder a run stages its results in, inside its output folder.
STAGING_PREFIX = ".diffgeo-partial-"


@contextlib.contextmanager
def run_scope(label: str, protect: Iterable[PathLike] = ()) -> Iterator[RunScope]:
    """Every :class:`ResultDir` opened inside writes into a staging folder; the files move into
    place only when the block ends normally, and a failure (an exception, Ctrl-C) removes the
    staging folder and any output folder the run created. Nested runs commit on their own."""
    scope = RunScope(label, [Path(p) for p in protect])
    token = _SCOPE.set(scope)
    try:
        yield scope
        for folder in scope.folders:
            folder.commit()
    except BaseException:
        for folder in scope.folders:
            folder.abort()  # a committed folder keeps its files: only an empty one it made goes
        raise
    finally:
        _SCOPE.reset(token)


def _write_error(target: Path, e: OSError) -> OutputError:
    reason = e.strerror or str(e)
    return OutputError(f"cannot write {target}: {reason}; nothing of this run was kept")


class ResultDir:
    """A folder for a run's outputs that is safe to write into.

    * The folder is created if needed (and removed again if a run that created it fails).
    * An existing file is never overwritten unless ``force=True`` (CLI: ``--force``) - except
      files this ResultDir itself wrote earlier in the same run, which it may update.
    * The user's inputs (``protect``, and every input of the verb run it belongs to) are never
      written, even with ``force``: not the file, not a hard link or symlink to it, nothing
      inside an input folder.
    * No write goes through a symlink inside the folder.
    * Every file is written to a temporary name and renamed into place, so an interrupted run
      never leaves a half-written file under the final name. Inside a verb run
      (:func:`run_scope`) the whole result is staged in a hidden sub-folder and moved into
      place when the run succeeds: a failed run leaves the folder as it found it.
    """

    def __init__(
        self, path: PathLike, force: bool = False, protect: Iterable[PathLike] | None = None
    ) -> None:
        self.path = Path(path)
        self.force = bool(force)
        scope = _SCOPE.get()
        self.label = scope.label if scope is not None else ""
        self.protect = [Path(p) for p in (protect or [])] + (scope.protect if scope else [])
        self._written: set[Path] = set()
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(
                f"output folder {self.path} exists and is not a folder; choose another --out"
            )
        for p in self.protect:
            if _same_file(self.path, p) or _inside(self.path, p):
                raise OutputExistsError(f"output folder {self.path} is (inside) the input {p}; "
                                        "choose another --out")
        self._created = [a for a in (self.path, *self.path.parents) if not a.exists()][::-1]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create output folder {self.path}: "
                             f"{e.strerror or e}") from None
        self.stage: Path | None = None
        if scope is not None:
            self.stage = self.path / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
            try:
                self.stage.mkdir()
            except OSError as e:
                self._remove_created()
                raise InputError(f"cannot write into output folder {self.path}: "
                                 f"{e.strerror or e}") from None
            scope.folders.append(self)

    def __repr__(self) -> str:
        return f"ResultDir({str(self.path)!r}, force={self.force})"

    def _check_target(self, rel: Path) -> Path:
        target = self.path / rel
        for p in self.protect:
            if _same_file(target, p) or _inside(target, p):
                raise OutputExistsError(
                    f"refusing to write {target}: it is one of the input files; "
                    f"choose another output folder (--force does not override this)"
                )
        for parent in list(rel.parents)[:-1]:
            if (self.path / parent).is_symlink():
                raise OutputExistsError(f"refusing to write {target}: {self.path / parent} is a "
                                        "symbolic link (results are never written through one)")
        if (os.path.lexists(target) and not self.force and rel not in self._written):
            raise OutputExistsError(f"{target} exists; pass --force (force=True) to overwrite")
        if target.is_dir() and not target.is_symlink() and rel.suffix:
            raise OutputExistsError(f"refusing to write {target}: it is a folder")
        return target

    def path_for(self, name: str) -> Path:
        """Where to write the result ``name`` now (the staging folder inside a run, else its
        final place), after checking that its final place may be written."""
        rel = Path(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise InputError(
                f"result name must be a relative path inside {self.path}; got {name!r}"
            )
        target = self._check_target(rel)
        if self.stage is None:
            return target
        staged = self.stage / rel
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def write(self, name: str, writer: Callable[[IO[Any]], None] | str,
              text: bool = False) -> Path:
        """Write the file ``name`` atomically (:func:`atomic_write`) as this run's own; returns
        where it can be read now (inside a run: its staged copy, until the run commits)."""
        target = self.path_for(name)
        try:
            atomic_write(target, writer, text)
        except OSError as e:
            raise _write_error(self.path / name, e) from None
        self._written.add(Path(name))
        return target

    def _staged_files(self) -> list[Path]:
        assert self.stage is not None
        return sorted(p.relative_to(self.stage) for p in self.stage.rglob("*")
                      if p.is_file() or p.is_symlink())

    def commit(self) -> None:
        """Move the staged files into place (every final name is checked before any moves)."""
        if self.stage is None or not self.stage.exists():
            return
        files = self._staged_files()
        for rel in files:
            self._check_target(rel)
        for rel in files:
            target = self.path / rel
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.stage / rel, target)
            except OSError as e:
                raise _write_error(target, e) from None
            self._written.add(rel)
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage = None

    def abort(self) -> None:
        """Drop what was staged; remove the output folders this run created if left empty."""
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only when empty: a file someone else put there stays
            except OSError:
                break

    def _finite(self, name: str, value: Any, allow_inf: bool = False) -> None:
        what = f"{self.label + ': ' if self.label else ''}the result {name}"
        try:
            check_finite(value, what, allow_inf)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; it was not written (a broken model, input or setting "
                                 "upstream)") from None

    @staticmethod
    def _named(name: str, suffix: str) -> str:
        s = Path(name).suffix
        if not s:
            return name + suffix
        if s.lower() != suffix:
            raise InputError(f"result name for a {suffix} file must end in {suffix}; got {name!r}")
        return name

    def save_image(self, name: str, x: torch.Tensor) -> Path:
        """Write an image in [-1, 1], (1, C, H, W) or (C, H, W) with C in {1, 3, 4}, as PNG."""
        self._finite(name, x)
        arr = to_uint8(x)
        if arr.shape[2] not in (1, 3, 4):
            raise InputError(f"image must have 1, 3 or 4 channels to save; got {arr.shape[2]}")
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        buf = _io.BytesIO()
        img.save(buf, format="PNG")
        return self.write(self._named(name, ".png"), lambda f: f.write(buf.getvalue()))

    def save_strip(self, name: str, images: Sequence[torch.Tensor], gap: int = 2) -> Path:
        """Write images side by side (same height) with a ``gap``-pixel white band between."""
        if len(images) == 0:
            raise InputError("save_strip needs at least one image; got none")
        xs = [x[None] if x.dim() == 3 else x for x in images]
        for i, x in enumerate(xs):
            if x.dim() != 4 or x.shape[0] != 1:
                raise InputError(
                    f"save_strip image {i} must be (1, C, H, W) or (C, H, W); got "
                    f"{tuple(images[i].shape)}"
                )
        heights = {int(x.shape[-2]) for x in xs}
        if len(heights) > 1:
            raise InputError(f"save_strip images must share one height; got {sorted(heights)}")
        c = max(int(x.shape[1]) for x in xs)
        parts: list[torch.Tensor] = []
        for i, x in enumerate(xs):
            x = x.detach().cpu().float()
            if x.shape[1] != c:
                if x.shape[1] != 1:
                    raise InputError(
                        f"save_strip images must have 1 or {c} channels; image {i} has {x.shape[1]}"
                    )
                x = x.expand(-1, c, -1, -1)
            if i and gap > 0:
                parts.append(torch.ones(1, c, x.shape[-2], gap))
            parts.append(x)
        return self.save_image(name, torch.cat(parts, dim=-1))

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` (converted by :func:`to_jsonable`) as JSON, sorted keys, indent 2. A NaN
        is allowed (as "nan"): settings record undefined measures, such as the locality ratio
        of an edit that changed nothing; the data files beside it are checked."""
        text = json.dumps(to_jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"
        return self.write(self._named(name, ".json"), lambda f: f.write(text), text=True)

    def save_npz(self, name: str, **arrays: Any) -> Path:
        """Write arrays (tensors are converted to numpy) into an uncompressed ``.npz``."""
        data = {
            k: tensor_to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)
            for k, v in arrays.items()
        }
        for k, v in data.items():
            self._finite(f"{name} ({k})", v, allow_inf=True)
        return self.write(self._named(name, ".npz"), lambda f: np.savez(f, **data))

    def save_csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence[Any]],
                 allow_nan: bool = False) -> Path:
        """Write a CSV with ``header`` and ``rows`` (each row as long as the header); a NaN
        cell is refused unless ``allow_nan``."""
        header = list(header)
        table = []
        for i, row in enumerate(rows):
            row = [_csv_value(v) for v in row]
            if len(row) != len(header):
                raise InputError(
                    f"CSV row {i} has {len(row)} values but the header has {len(header)}"
                )
            table.append(row)
        if not allow_nan:
            self._finite(name, np.array([v for row in table for v in row
                                         if isinstance(v, float)], dtype=float), allow_inf=True)

        def write(f: IO[str]) -> None:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(table)

        return self.write(self._named(name, ".csv"), write, text=True)
