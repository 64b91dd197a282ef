"""Evaluation: volumes x methods x acquisition settings into one table (CSV and JSON) and figures.

Driven by ``configs/evaluate.json`` (merged over ``configs/inference.json``, whose
preprocessing and networks it reuses). Each cell is one :class:`bundle.reconstruction.Reconstruction`
run writing its own outputs under ``output_dir/<volume>/<setting>/<method>/``.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bundle.io import atomic_path, save_json
from bundle.reconstruction import Reconstruction, input_name
from bundle.recon.inferers import make_inferer

__all__ = ["Evaluation", "TABLE_COLUMNS", "write_table", "plot_table"]

logger = logging.getLogger(__name__)

TABLE_COLUMNS: tuple[str, ...] = (
    "volume",
    "setting",
    "method",
    "psnr_3d",
    "ssim_3d",
    "psnr_axial",
    "psnr_coronal",
    "psnr_sagittal",
    "ssim_axial",
    "ssim_coronal",
    "ssim_sagittal",
    "seconds",
    "nfe",
    "peak_memory_mb",
)
SETTING_KEYS = ("views", "arc_degrees", "step_degrees", "photons", "electronic_noise", "beam")


def write_table(rows: Sequence[Mapping[str, Any]], output_dir: str | Path, name: str = "results") -> tuple[Path, Path]:
    """Write ``rows`` as ``<name>.csv`` (the :data:`TABLE_COLUMNS`) and ``<name>.json`` (everything), atomically."""
    output_dir = Path(output_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path = output_dir / f"{name}.csv"
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buffer.getvalue())
    return csv_path, save_json({"rows": list(rows)}, output_dir / f"{name}.json")


def plot_table(rows: Sequence[Mapping[str, Any]], path: str | Path, metrics: Sequence[str] = ("psnr_3d", "ssim_3d", "psnr_coronal", "psnr_sagittal")) -> Path:
    """Grouped bar charts: one panel per metric, settings on the x axis, one bar per method (mean over volumes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    metrics = [m for m in metrics if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4 * max(len(metrics), 1), 3.2), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, metric in zip(axes[0], metrics):
        for j, method in enumerate(methods):
            values = [
                np.mean([r[metric] for r in rows if r["setting"] == s and r["method"] == method and metric in r] or [np.nan])
                for s in settings
            ]
            ax.bar(np.arange(len(settings)) + j * width, values, width, label=method)
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings, fontsize=8)
        ax.set_title(metric, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


class Evaluation:
    """Reconstruct every volume with every method under every setting; write one table and figures.

    Args:
        volumes: CT volumes (NIfTI/NRRD/DICOM folders) used as ground truth.
        methods: method names of :func:`bundle.recon.inferers.make_inferer`.
        settings: acquisition settings, each a mapping with a ``name`` and any of ``views``,
            ``arc_degrees``, ``step_degrees``, ``photons``, ``electronic_noise``, ``beam``.
        output_dir: where the per-run outputs, ``results.csv``, ``results.json`` and ``results.png`` go.
        preprocessing: the inference preprocessing (to the model grid).
        inferer_settings: settings passed to every ``make_inferer`` call (steps, eta, seed, ...).
        network: the slab prior; ckpt_path: its weights.
        network_2d: the 2D prior; ckpt_path_2d: its weights.
        seed: seed of the simulation and the sampler.
        device: where to reconstruct.
        hu_max: as in the preprocessing.
        make_inferer_fn: the inferer factory (for tests).
    """

    def __init__(
        self,
        volumes: Sequence[str | Path],
        methods: Sequence[str],
        settings: Sequence[Mapping[str, Any]],
        output_dir: str | Path,
        preprocessing: Callable[[dict], dict],
        inferer_settings: Mapping[str, Any] | None = None,
        network: torch.nn.Module | None = None,
        ckpt_path: str | Path | None = None,
        network_2d: torch.nn.Module | None = None,
        ckpt_path_2d: str | Path | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        hu_max: float = 2000.0,
        make_inferer_fn: Callable[..., Any] = make_inferer,
    ) -> None:
        if not volumes or not methods or not settings:
            raise ValueError("evaluation needs at least one volume, one method and one setting")
        for s in settings:
            unknown = set(s) - set(SETTING_KEYS) - {"name"}
            if unknown:
                raise ValueError(f"setting {dict(s)} has unknown keys {sorted(unknown)}; allowed: {SETTING_KEYS}")
        for method in methods:
            make_inferer_fn(method)  # fail early on an unknown method
        self.volumes = [Path(v) for v in volumes]
        missing = [str(v) for v in self.volumes if not v.exists()]
        if missing:
            raise FileNotFoundError(f"evaluation volumes do not exist: {missing}")
        self.methods = list(methods)
        self.settings = [dict(s) for s in settings]
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing
        self.inferer_settings = dict(inferer_settings or {})
        self.network, self.ckpt_path = network, ckpt_path
        self.network_2d, self.ckpt_path_2d = network_2d, ckpt_path_2d
        self.seed = int(seed)
        self.device = device
        self.hu_max = float(hu_max)
        self.make_inferer_fn = make_inferer_fn

    @staticmethod
    def setting_name(setting: Mapping[str, Any]) -> str:
        """A setting's name: its ``name``, or one made from its values."""
        if setting.get("name"):
            return str(setting["name"])
        return "_".join(f"{k}{setting[k]}" for k in SETTING_KEYS if k in setting) or "default"

    def run(self) -> list[dict[str, Any]]:
        """Run every cell; write ``results.csv``, ``results.json`` and ``results.png``; return the rows."""
        rows: list[dict[str, Any]] = []
        for volume in self.volumes:
            for setting in self.settings:
                label = self.setting_name(setting)
                acquisition = {k: setting[k] for k in SETTING_KEYS if k in setting}
                for method in self.methods:
                    out_dir = self.output_dir / input_name(volume) / label.replace(" ", "_") / method
                    logger.info("evaluating %s | %s | %s", input_name(volume), label, method)
                    metrics = Reconstruction(
                        input_path=volume,
                        output_dir=out_dir,
                        preprocessing=self.preprocessing,
                        inferer=self.make_inferer_fn(method, **{**self.inferer_settings, "seed": self.seed}),
                        network=self.network,
                        ckpt_path=self.ckpt_path,
                        network_2d=self.network_2d,
                        ckpt_path_2d=self.ckpt_path_2d,
                        seed=self.seed,
                        device=self.device,
                        hu_max=self.hu_max,
                        **acquisition,
                    ).run()
                    row = {"volume": input_name(volume), "setting": label, "method": method, **acquisition}
                    row.update({k: v for k, v in metrics.items() if k not in ("geometry", "inferer", "input")})
                    rows.append(row)
                    write_table(rows, self.output_dir)  # keep a partial table if a later cell fails
        write_table(rows, self.output_dir)
        plot_table(rows, self.output_dir / "results.png")
        return rows
