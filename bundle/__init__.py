"""DiffusionBlend CT: 3D CT reconstruction with a 3D-patch diffusion prior, as a MONAI bundle."""

__version__ = "0.3.0"
