"""Backbones: every diffusion model seen through one interface (see ``base``)."""

from diffgeo.backbones.base import Backbone, BackboneSummary, Conditioning, Encoded
from diffgeo.backbones.functional import FunctionalBackbone, linear_gaussian
from diffgeo.backbones.latent import LatentBackbone
from diffgeo.backbones.load import DEFAULT_MODEL, default_model_path, load_backbone
from diffgeo.backbones.pixel import PixelBackbone

__all__ = [
    "Backbone", "BackboneSummary", "Conditioning", "Encoded", "FunctionalBackbone",
    "LatentBackbone", "PixelBackbone", "DEFAULT_MODEL", "default_model_path", "linear_gaussian",
    "load_backbone",
]
