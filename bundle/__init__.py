"""DiffusionBlend CT: 3D CT reconstruction with a 3D-patch diffusion prior, as a MONAI bundle.

The version is defined once, in ``configs/metadata.json`` (the bundle's own metadata, as the
MONAI model zoo reads it); the package, ``pyproject.toml`` and MONAI Label's ``/info/`` read it
from there.
"""

import json as _json
from pathlib import Path as _Path

METADATA = _Path(__file__).resolve().parents[1] / "configs" / "metadata.json"
__version__: str = _json.loads(METADATA.read_text())["version"]
