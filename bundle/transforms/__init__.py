"""MONAI MapTransforms of the bundle."""

from bundle.transforms.intensity import HUToNormalizedd, ValidateVolumed
from bundle.transforms.slab import RandSlabd, slab_span

__all__ = ["HUToNormalizedd", "RandSlabd", "ValidateVolumed", "slab_span"]
