"""A set of h-space directions found for one region at one timestep, and its files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffgeo.errors import InputError, OutputExistsError

_FORMAT = "diffgeo-rbe-directions/1"
_TENSORS = "directions.safetensors"
_META = "directions.json"


@dataclass
class Directions:
    """h-space directions of one region at one timestep (what :func:`directions_at` found).

    ``vectors`` (k, *h_shape): the directions to edit with, unit norm, after the Eq. 14
    projection (equal to ``raw_vectors`` for ``project_against="none"`` and for global
    directions). ``raw_vectors``: the leading right singular vectors of J_M (orthonormal, sign
    convention applied). ``singular_values`` (k,), float64: those of J_M (of J for global
    directions). ``unmasked_vectors`` / ``unmasked_values``: the top k_u right singular pairs of
    J_U (None for global directions). ``mask``: the region on the state grid (h, w), None for
    global directions. ``settings``: everything needed to reproduce the run, plus its cost,
    convergence (``settings["masked_run"]`` / ``["unmasked_run"]``, summarised by
    :attr:`converged` and :attr:`error_bound`), and the decoder response of raw and projected
    vectors inside / outside the region (``settings["response"]``).
    """

    vectors: torch.Tensor
    raw_vectors: torch.Tensor
    singular_values: torch.Tensor
    timestep: int
    num_steps: int | None
    unmasked_vectors: torch.Tensor | None = None
    unmasked_values: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    #: The tensor file these were read from (None when computed): errors about them name it.
    source: Path | None = field(default=None, compare=False, repr=False)

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def h_shape(self) -> tuple[int, ...]:
        return tuple(self.vectors.shape[1:])

    def _runs(self) -> list[dict[str, Any]]:
        runs = (self.settings.get("masked_run"), self.settings.get("unmasked_run"))
        return [r for r in runs if isinstance(r, dict)]

    @property
    def converged(self) -> bool:
        """Every power iteration behind these directions passed its residual test
        (:class:`diffgeo.tangent.PowerIterationConfig` says what that guarantees)."""
        runs = self._runs()
        return bool(runs) and all(bool(r.get("converged")) for r in runs)

    @property
    def error_bound(self) -> float | None:
        """The largest angle bound (radians) of those runs: of the raw vectors' span, and of
        the unmasked span they were projected against; None when a run has none."""
        bounds = [r.get("error_bound") for r in self._runs()]
        if not bounds or any(b is None for b in bounds):
            return None
        return float(max(bounds))

    def save(self, folder: str | Path, force: bool = False) -> Path:
        """Write ``directions.safetensors`` (tensors) and ``directions.json`` (the rest).

        Refuses to overwrite either file unless ``force``: directions are costly to recompute
        and silently replacing a set that edits were made with loses the link between them.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        targets = [folder / _TENSORS, folder / _META]
        existing = [p for p in targets if p.exists()]
        if existing and not force:
            raise OutputExistsError(f"{existing[0]} exists; pass force=True (CLI: --force) to "
                                    "overwrite it")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors, "raw_vectors": self.raw_vectors,
                   "singular_values": self.singular_values}
        for name in ("unmasked_vectors", "unmasked_values", "mask"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(targets[0]))
        from diffgeo.io import to_jsonable

        meta = {"format": _FORMAT, "timestep": self.timestep, "num_steps": self.num_steps,
                "k": self.k, "h_shape": list(self.h_shape),
                "settings": to_jsonable(self.settings)}
        targets[1].write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Directions:
        """Read a folder written by :meth:`save` (tensors on the CPU, in their saved dtype).

        ``folder`` may also be the folder above it, as ``diffgeo directions --out DIR`` writes
        it (DIR holds the previews and DIR/directions the vectors). Every fault of the files is
        an :class:`InputError` naming the file; whether the vectors fit a model is checked where
        they meet it (:func:`apply_direction`), which names the file too (``source``).
        """
        from diffgeo.backbones.load import load_safetensors, read_json_file

        folder = _directions_folder(Path(folder))
        tpath, mpath = folder / _TENSORS, folder / _META
        meta = read_json_file(mpath, "directions metadata")
        if meta.get("format") != _FORMAT:
            raise InputError(f"{mpath} has format {meta.get('format')!r}, expected {_FORMAT!r}")
        t = load_safetensors(tpath)
        _check_tensors(t, tpath)
        k, h_shape = int(t["vectors"].shape[0]), list(t["vectors"].shape[1:])
        for key, want in (("k", k), ("h_shape", h_shape)):
            if key in meta and meta[key] != want:
                raise InputError(f"{mpath} gives {key} {meta[key]!r} but {tpath} holds {want!r}: "
                                 "the two files come from different runs")
        timestep, num_steps = meta.get("timestep"), meta.get("num_steps")
        # an integer timestep, or a flow model's float model time σ·T
        if isinstance(timestep, bool) or not isinstance(timestep, int | float) or timestep < 0:
            raise InputError(f"{mpath}: timestep must be a number >= 0, got {timestep!r}")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                      or num_steps < 1):
            raise InputError(f"{mpath}: num_steps must be an integer >= 1 or null, "
                             f"got {num_steps!r}")
        settings = meta.get("settings", {})
        if not isinstance(settings, dict):
            raise InputError(f"{mpath}: settings must be an object, got {settings!r}")
        return cls(vectors=t["vectors"], raw_vectors=t["raw_vectors"],
                   singular_values=t["singular_values"], timestep=timestep,
                   num_steps=num_steps, unmasked_vectors=t.get("unmasked_vectors"),
                   unmasked_values=t.get("unmasked_values"), mask=t.get("mask"),
                   settings=settings, source=tpath)


def _directions_folder(folder: Path) -> Path:
    """``folder`` or, when it is what ``diffgeo directions --out`` wrote, its directions/."""
    if not folder.is_dir():
        what = "it does not exist" if not folder.exists() else "it is a file"
        raise InputError(f"{folder} is not a directions folder: {what} (pass the folder "
                         "`diffgeo directions --out` wrote, or the directions/ inside it)")
    inner = folder / "directions"
    if not any((folder / n).exists() for n in (_TENSORS, _META)) and inner.is_dir():
        folder = inner
    present = [n for n in (_TENSORS, _META) if (folder / n).is_file()]
    if not present:
        raise InputError(f"{folder} is not a directions folder: expected {_TENSORS} and "
                         f"{_META} (written by Directions.save)")
    if len(present) == 1:
        missing = _META if present[0] == _TENSORS else _TENSORS
        raise InputError(f"{folder / missing} is missing: a directions folder holds both "
                         f"{_TENSORS} and {_META} (written together by Directions.save)")
    return folder


def _check_tensors(t: dict[str, torch.Tensor], path: Path) -> None:
    """The tensors of a directions file agree with each other (a hand-edited or foreign file
    would otherwise fail deep inside an edit)."""
    for name in ("vectors", "raw_vectors", "singular_values"):
        if name not in t:
            raise InputError(f"{path} has no tensor {name!r}: not a directions file "
                             f"(it holds {sorted(t)})")
    v = t["vectors"]
    if v.ndim < 2 or v.shape[0] < 1 or not v.is_floating_point():
        raise InputError(f"{path}: vectors must be floating point, shape (k, *h_shape), got "
                         f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}")
    k, h_shape = v.shape[0], tuple(v.shape[1:])
    want = {"raw_vectors": (k, *h_shape), "singular_values": (k,)}
    if "unmasked_vectors" in t:
        ku = t["unmasked_vectors"].shape[0] if t["unmasked_vectors"].ndim else 0
        want["unmasked_vectors"] = (ku, *h_shape)
        if "unmasked_values" in t:
            want["unmasked_values"] = (ku,)
    for name, shape in want.items():
        if tuple(t[name].shape) != shape:
            raise InputError(f"{path}: {name} has shape {list(t[name].shape)}, expected "
                             f"{list(shape)} (vectors are {list(v.shape)})")
    if "mask" in t and t["mask"].ndim != 2:
        raise InputError(f"{path}: mask must be 2-D (h, w), got shape {list(t['mask'].shape)}")
