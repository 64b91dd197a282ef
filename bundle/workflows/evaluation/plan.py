"""The evaluation's plan: every cell (volume x setting x method) as plain data, built by one pure function.

A cell knows what it reconstructs and where its outputs go; nothing here reads a file or runs
a method. :func:`plan_cells` checks the settings (their names, and their values through
:class:`~bundle.physics.acquisition.Acquisition`) and the method variants before any cell runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bundle.physics.acquisition import Acquisition
from bundle.workflows.sources import input_name

__all__ = ["SETTING_KEYS", "Cell", "MethodSpec", "plan_cells", "setting_name"]

#: The keys a setting may have besides its ``name``: the fields of the simulated scan.
SETTING_KEYS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Acquisition))


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method of the evaluation: a name of ``make_inferer`` and, for a variant, its name and settings.

    Args:
        method: a name of :func:`bundle.recon.inferers.make_inferer`.
        variant: the variant's name (``""``: the method with the evaluation's settings).
        settings: what the variant changes (e.g. ``{"lam": 5e-4}``, ``{"samples": 4}``).
    """

    method: str
    variant: str = ""
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, method: str | Mapping[str, Any]) -> MethodSpec:
        """``"tv"`` or ``{"method": "tv", "variant": ..., "settings": {...}}``; a variant without a name is named by its settings."""
        if isinstance(method, str):
            return cls(method)
        if "method" not in method:
            raise ValueError(f"a method variant needs a 'method' key, got {dict(method)}")
        settings = dict(method.get("settings") or {})
        variant = str(method.get("variant") or ",".join(f"{k}={v}" for k, v in settings.items()))
        return cls(str(method["method"]), variant, settings)


def setting_name(setting: Mapping[str, Any]) -> str:
    """A setting's name: its ``name``, or one made from its values (``views4_photons100000.0``)."""
    if setting.get("name"):
        return str(setting["name"])
    return "_".join(f"{k}{setting[k]}" for k in SETTING_KEYS if k in setting) or "default"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One reconstruction of the evaluation.

    Args:
        index: its place in the plan (the table's row order; ``torchrun`` ranks share cells by it).
        volume: the ground-truth volume.
        setting: the setting's name.
        acquisition: the setting's scan keys as given (:data:`SETTING_KEYS`).
        method: a name of ``make_inferer``.
        variant: the variant's name, or ``""``.
        inferer_settings: what ``make_inferer`` receives: the evaluation's settings, the variant's, the seed.
        samples: reconstructions averaged (the posterior mean for ``samples > 1``).
        seed: seed of the simulation and of the first sample.
    """

    index: int
    volume: Path
    setting: str
    acquisition: Mapping[str, Any]
    method: str
    variant: str
    inferer_settings: Mapping[str, Any]
    samples: int
    seed: int

    @property
    def name(self) -> str:
        """The volume's name (the table's ``volume``)."""
        return input_name(self.volume)

    @property
    def setting_folder(self) -> str:
        """The setting's name as a folder name."""
        return self.setting.replace(" ", "_").replace(",", "")

    @property
    def scan(self) -> Acquisition:
        """The simulated scan of the setting."""
        return Acquisition(**self.acquisition)

    @property
    def slab_size(self) -> int:
        """The slab size the method is configured with (the prior it needs: ``Priors.for_method``)."""
        return int(self.inferer_settings.get("slab_size", 3))

    @property
    def label(self) -> str:
        """``volume | setting | method variant``, for messages."""
        return f"{self.name} | {self.setting} | {self.method} {self.variant}".rstrip()

    def folder(self, output_dir: str | Path) -> Path:
        """Where the cell's outputs go: ``output_dir/<volume>/<setting>/<method>[_<variant>]``."""
        method = self.method + (f"_{self.variant}".replace(" ", "_") if self.variant else "")
        return Path(output_dir) / self.name / self.setting_folder / method

    def recon_path(self, output_dir: str | Path) -> Path:
        """The cell's reconstruction (HU NIfTI)."""
        return self.folder(output_dir) / f"{self.name}_recon.nii.gz"


def plan_cells(
    volumes: Sequence[str | Path],
    settings: Sequence[Mapping[str, Any]],
    methods: Sequence[str | Mapping[str, Any]],
    inferer_settings: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Cell, ...]:
    """Every cell, volume by volume, setting by setting, method by method (the table's order).

    Raises:
        ValueError: no volume, setting or method; a setting with an unknown key or a bad value
            (naming it); a variant without a method.
    """
    if not volumes or not methods or not settings:
        raise ValueError("evaluation needs at least one volume, one method and one setting")
    scans = []
    for setting in settings:
        unknown = set(setting) - set(SETTING_KEYS) - {"name"}
        if unknown:
            raise ValueError(f"setting {dict(setting)} has unknown keys {sorted(unknown)}; allowed: {SETTING_KEYS}")
        acquisition = {k: setting[k] for k in SETTING_KEYS if k in setting}
        Acquisition(**acquisition)  # a bad value fails here, naming its setting
        scans.append((setting_name(setting), acquisition))
    specs = [MethodSpec.parse(m) for m in methods]
    grid = [(Path(v), s, spec) for v in volumes for s in scans for spec in specs]
    cells = []
    for index, (volume, (name, acquisition), spec) in enumerate(grid):
        merged = {**(inferer_settings or {}), **spec.settings, "seed": int(seed)}
        samples = int(merged.pop("samples", 1))
        cells.append(Cell(index, volume, name, acquisition, spec.method, spec.variant, merged, samples, int(seed)))
    return tuple(cells)
