"""Editing methods over a Backbone; each returns a result dataclass with the settings used."""

from diffgeo.editing.rbe import (
    Directions,
    EditResult,
    Locality,
    apply_direction,
    asymmetric_step,
    directions_at,
    discover_directions,
    edit_locality,
    global_directions,
    masked_response,
    project_out,
    state_mask,
)

__all__ = [
    "Directions", "EditResult", "Locality", "apply_direction", "asymmetric_step",
    "directions_at", "discover_directions", "edit_locality", "global_directions",
    "masked_response", "project_out", "state_mask",
]

from diffgeo.editing.pixels import (  # noqa: E402
    THRESHOLDS,
    PixelsResult,
    edit_start,
    grow_and_blur,
    pixels_edit,
    pixels_iterative,
    place_exemplar,
    prepare_map,
    threshold_schedule,
)

__all__ += [
    "THRESHOLDS", "PixelsResult", "edit_start", "grow_and_blur", "pixels_edit",
    "pixels_iterative", "place_exemplar", "prepare_map", "threshold_schedule",
]

from diffgeo.editing.curve_matching import (  # noqa: E402
    CurveMatchingConfig,
    CurveMatchingResult,
    curve_matching,
)
from diffgeo.editing.tasks import blend, boundary_band, remove, saliency, transfer  # noqa: E402

__all__ += [
    "CurveMatchingConfig", "CurveMatchingResult", "blend", "boundary_band", "curve_matching",
    "remove", "saliency", "transfer",
]

from diffgeo.editing.inpaint import mean_fill, repaint  # noqa: E402

__all__ += ["mean_fill", "repaint"]
