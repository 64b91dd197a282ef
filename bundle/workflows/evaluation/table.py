"""The evaluation's table: one row per cell, written as CSV (the main columns) and JSON (everything).

Of the variants of one method and number of samples, the best by PSNR per volume and setting is
marked ``selected`` (:func:`select_best`); the figures show the selected ones.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.io import atomic_path, save_json
from bundle.workflows.evaluation.plan import Cell

__all__ = ["NFE_COLUMNS", "TABLE_COLUMNS", "cell_row", "figure_columns", "method_label", "select_best", "write_table"]

TABLE_COLUMNS: tuple[str, ...] = (
    "volume", "setting", "method", "psnr_3d", "ssim_3d", "mae_body_hu", "psnr_axial", "psnr_coronal", "psnr_sagittal",
    "ssim_axial", "ssim_coronal", "ssim_sagittal", "seconds", "nfe", "peak_memory_mb", "variant", "samples", "selected",
    "note",
)  # fmt: skip
NFE_COLUMNS: tuple[str, ...] = (
    "volume", "setting", "method", "steps", "nfe", "seconds", "psnr_3d", "ssim_3d", "mae_body_hu",
    "psnr_coronal", "psnr_sagittal", "peak_memory_mb", "note",
)  # fmt: skip
_NOT_IN_ROWS = ("geometry", "inferer", "input")  # metrics.json fields the table leaves out


def cell_row(cell: Cell, metrics: Mapping[str, Any] | None, recon_path: Path | None, note: str = "") -> dict[str, Any]:
    """The table row of ``cell``: its coordinates and scan, then its ``metrics`` (``None``: not run, ``note`` says why)."""
    row: dict[str, Any] = {"volume": cell.name, "setting": cell.setting, "method": cell.method, "variant": cell.variant,
                           **cell.acquisition}  # fmt: skip
    if metrics is None:
        return {**row, "note": note}
    row["samples"] = cell.samples
    row.update({k: v for k, v in metrics.items() if k not in _NOT_IN_ROWS})
    row.update(method=cell.method, note=note, recon_path=str(recon_path))
    return row


def write_table(
    rows: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    name: str = "results",
    columns: Sequence[str] = TABLE_COLUMNS,
) -> tuple[Path, Path]:
    """Write ``rows`` as ``<name>.csv`` (``columns``, :data:`TABLE_COLUMNS` by default) and ``<name>.json`` (everything), atomically."""
    output_dir = Path(output_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path = output_dir / f"{name}.csv"
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buffer.getvalue())
    return csv_path, save_json({"rows": list(rows)}, output_dir / f"{name}.json")


def select_best(rows: Sequence[dict[str, Any]], metric: str = "psnr_3d") -> list[dict[str, Any]]:
    """Mark in place, per volume, setting, method and samples, the variant with the highest ``metric`` as ``selected``.

    Rows without the metric (skipped runs) are selected only when no variant has it.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["volume"], row["setting"], row["method"], row.get("samples", 1)), []).append(row)
    for group in groups.values():
        scored = [r for r in group if metric in r and np.isfinite(r[metric])]
        best = max(scored, key=lambda r: r[metric]) if scored else group[0]
        for row in group:
            row["selected"] = row is best
    return list(rows)


def figure_columns(rows: Sequence[Mapping[str, Any]], volume: str, setting: str) -> list[tuple[str, str, Path | None]]:
    """``(label, reconstruction, std or None)`` of the selected rows of ``volume`` and ``setting`` that ran: what their figures show."""
    shown = []
    for r in rows:
        if r["volume"] == volume and r["setting"] == setting and r["selected"] and r.get("recon_path"):
            std = Path(r["recon_path"].replace("_recon.nii.gz", "_std.nii.gz"))
            shown.append((method_label(r), r["recon_path"], std if r.get("samples", 1) > 1 and std.is_file() else None))
    return shown


def method_label(row: Mapping[str, Any]) -> str:
    """A row's method as shown in figures: ``"dbpp"``, or ``"dbpp, mean of 4"`` for a posterior mean."""
    samples = int(row.get("samples", 1) or 1)
    return row["method"] if samples == 1 else f"{row['method']}, mean of {samples}"
