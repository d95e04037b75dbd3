"""diffgeo: the geometry of pretrained diffusion models as tools.

The entry points a researcher needs, importable from the package itself (loaded on first use,
so ``import diffgeo`` stays cheap)::

    bb = diffgeo.load_backbone("default")                 # any diffusers model, or ours
    x, fit = diffgeo.load_image("photo.png", size=bb.image_size, fit="crop")
    path = diffgeo.invert(bb, bb.to_state(x), t=980, grid=50)
    curves = diffgeo.generation_curves(bb, path, [diffgeo.pixel_component(bb, (12, 20))], "h")

Loading: ``load_backbone``, ``load_image``, ``load_mask``. Sampling: ``Grid``, ``invert``,
``generate``, ``reconstruct``. Geometry: ``tangent_basis``, ``generation_curves``,
``pixel_component``, ``mask_component``, ``rate_maps_along``. Editing: ``curve_matching``
with ``CurveMatchingConfig`` and its tasks ``transfer``, ``remove``, ``saliency``, ``blend``;
``discover_directions`` and ``apply_direction`` with ``RBEConfig`` and ``RBEEditConfig``
(RBE); ``pixels_edit`` with ``PixelsConfig`` (PIXELS).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_ENTRY_POINTS: dict[str, str] = {
    "load_backbone": "diffgeo.backbones",
    "load_image": "diffgeo.io",
    "load_mask": "diffgeo.io",
    "Grid": "diffgeo.sampling",
    "invert": "diffgeo.sampling",
    "generate": "diffgeo.sampling",
    "reconstruct": "diffgeo.sampling",
    "tangent_basis": "diffgeo.tangent",
    "generation_curves": "diffgeo.curves",
    "pixel_component": "diffgeo.curves",
    "mask_component": "diffgeo.curves",
    "rate_maps_along": "diffgeo.maps",
    "curve_matching": "diffgeo.editing.curve_matching",
    "CurveMatchingConfig": "diffgeo.editing",
    "transfer": "diffgeo.editing",
    "remove": "diffgeo.editing",
    "saliency": "diffgeo.editing",
    "blend": "diffgeo.editing",
    "discover_directions": "diffgeo.editing",
    "apply_direction": "diffgeo.editing",
    "RBEConfig": "diffgeo.editing",
    "RBEEditConfig": "diffgeo.editing",
    "pixels_edit": "diffgeo.editing",
    "PixelsConfig": "diffgeo.editing",
}

__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        value = getattr(import_module(_ENTRY_POINTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffgeo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
