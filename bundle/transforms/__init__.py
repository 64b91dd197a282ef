"""MONAI MapTransforms of the bundle, and the (1, X, Y, Z) <-> (Z, Y, X) layout helpers."""

from bundle.transforms.intensity import HUToNormalizedd, ValidateVolumed
from bundle.transforms.layout import from_zhw, to_zhw, voxel_size_zhw
from bundle.transforms.sinogram import (
    LoadSinogramd,
    SimulateSinogramd,
    find_sinogram_geometry,
    geometry_path_for,
    load_sinogram,
    save_sinogram,
)
from bundle.transforms.slab import RandSlabd, slab_span

__all__ = [
    "HUToNormalizedd",
    "LoadSinogramd",
    "RandSlabd",
    "SimulateSinogramd",
    "ValidateVolumed",
    "find_sinogram_geometry",
    "from_zhw",
    "geometry_path_for",
    "load_sinogram",
    "save_sinogram",
    "slab_span",
    "to_zhw",
    "voxel_size_zhw",
]
