"""Files in and out: images (:mod:`~diffgeo.io.images`), regions — masks, points, boxes and how
each use resamples them (:mod:`~diffgeo.io.regions`) — and result folders
(:mod:`~diffgeo.io.results`)."""

from diffgeo.io.images import (
    FIT_MODES,
    Fit,
    fit_tensor,
    image_from_array,
    load_image,
    load_images,
    to_uint8,
    validate_point,
)
from diffgeo.io.regions import box_mask, load_mask, parse_box, parse_point
from diffgeo.io.results import ResultDir, atomic_write, to_jsonable

__all__ = [
    "FIT_MODES", "Fit", "ResultDir", "atomic_write", "box_mask", "fit_tensor",
    "image_from_array", "load_image", "load_images", "load_mask", "parse_box", "parse_point",
    "to_jsonable", "to_uint8", "validate_point",
]
