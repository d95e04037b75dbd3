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
        """Read a folder written by :meth:`save` (tensors on the CPU, in their saved dtype)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        tpath, mpath = folder / _TENSORS, folder / _META
        if not tpath.is_file() or not mpath.is_file():
            raise InputError(f"{folder} is not a directions folder: expected {_TENSORS} and "
                             f"{_META} (written by Directions.save)")
        meta = json.loads(mpath.read_text())
        if meta.get("format") != _FORMAT:
            raise InputError(f"{mpath} has format {meta.get('format')!r}, expected {_FORMAT!r}")
        t = load_file(str(tpath))
        return cls(vectors=t["vectors"], raw_vectors=t["raw_vectors"],
                   singular_values=t["singular_values"], timestep=int(meta["timestep"]),
                   num_steps=meta["num_steps"], unmasked_vectors=t.get("unmasked_vectors"),
                   unmasked_values=t.get("unmasked_values"), mask=t.get("mask"),
                   settings=meta.get("settings", {}))
