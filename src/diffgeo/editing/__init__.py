"""The three editing methods over a Backbone and a grid, and the removal baselines.

Each method takes its inputs and settings and returns a result dataclass that records the
settings used: region-based h-space directions (:mod:`~diffgeo.editing.rbe`), progressive
exemplar editing (:mod:`~diffgeo.editing.pixels`), curve matching and its four tasks
(:mod:`~diffgeo.editing.curve_matching`, :mod:`~diffgeo.editing.tasks`), and the inpainting
baselines removal is judged by (:mod:`~diffgeo.editing.inpaint`). Building blocks (steps,
projections, map preparation) stay in their modules.
"""

from diffgeo.editing.curve_matching import CurveMatchingConfig, CurveMatchingResult
from diffgeo.editing.inpaint import mean_fill, repaint
from diffgeo.editing.pixels import (
    THRESHOLDS,
    PixelsConfig,
    PixelsResult,
    pixels_edit,
    pixels_iterative,
)
from diffgeo.editing.rbe import (
    Directions,
    EditResult,
    RBEConfig,
    RBEEditConfig,
    apply_direction,
    discover_directions,
    global_directions,
)
from diffgeo.editing.tasks import blend, remove, saliency, transfer

__all__ = [
    "THRESHOLDS", "CurveMatchingConfig", "CurveMatchingResult", "Directions", "EditResult",
    "PixelsConfig", "PixelsResult", "RBEConfig", "RBEEditConfig", "apply_direction", "blend",
    "discover_directions", "global_directions", "mean_fill", "pixels_edit", "pixels_iterative",
    "remove", "repaint", "saliency", "transfer",
]
