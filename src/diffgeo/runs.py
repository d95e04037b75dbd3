"""Transitional: the old file-in, folder-out functions now live in :mod:`diffgeo.verbs`.

Only ``exemplar_edit`` remains, for callers outside the verb layer that still use it
(tests/test_pixels.py); new code calls ``diffgeo.verbs.run("exemplar", ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffgeo.backbones.base import Backbone


def exemplar_edit(source: str | Path, *, exemplars: Sequence[str | Path],
                  maps: Sequence[str | Path], model: str | Backbone = "default",
                  num_steps: int = 50, placements: Sequence[str] | None = None,
                  **options: Any) -> dict[str, Any]:
    """The ``exemplar`` verb under its old argument names; returns its settings plus
    ``result`` (the edited image) and ``passes`` (one PixelsResult per pass)."""
    from diffgeo import verbs

    backbone = model if isinstance(model, Backbone) else None
    res = verbs.run("exemplar", backbone=backbone, source=source, exemplar=tuple(exemplars),
                    map=tuple(maps), steps=num_steps, place=tuple(placements or ()),
                    **({} if backbone is not None else {"model": model}), **options)
    return {**res.settings, "result": res.image, "passes": res.passes}
