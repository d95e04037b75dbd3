"""diffgeo: the geometry of pretrained diffusion models as tools."""

from __future__ import annotations

__version__ = "0.1.0"
