"""Evaluation: volumes x methods x acquisition settings into one table (CSV and JSON) and figures.

Driven by ``configs/evaluate.json`` (merged over ``configs/inference.json``, whose
preprocessing and networks it reuses) and by ``scripts/benchmark.py``. Each cell is one
:class:`bundle.workflows.inference.Reconstruction` run writing its own outputs under
``output_dir/<volume>/<setting>/<method>[_<variant>]/``.

A method is a name of :func:`bundle.recon.inferers.make_inferer` or a *variant*: a mapping
``{"method": "tv", "variant": "lam=0.0005", "settings": {"lam": 5e-4}}`` (e.g. a sweep of a
weight). A variant's ``samples`` setting (diffusion methods) makes the cell the mean of that many
reconstructions with consecutive seeds, the posterior-mean estimate; it is reported as its own
method row (``samples`` column), never pooled with the single-sample one. Of the variants of one
method and number of samples, the best by PSNR per volume and setting is marked ``selected``;
the figures show the selected ones. A method whose prior's weights file is
missing is not run: its row says so in ``note``.

With ``resume=True`` a cell whose outputs are already in its folder is read back instead of
run again, if its ``cell.json`` matches the cell exactly: method, settings, samples,
acquisition, seed, a digest of the preprocessed ground truth (so a change of grid, spacing or
intensity mapping counts) and a digest of the prior's weights file. A long CPU benchmark can
so be stopped and continued, or extended by a method, without recomputing what it has.

Figures per volume and setting (``figures=True``), from the written reconstructions and the
ground truth, all in HU on one window: orthogonal views side by side, difference maps, and a
z-profile through a high-contrast point of the ground truth (a fixed (y, x) line along z).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.io import atomic_path, file_sha256, orthogonal_cuts, save_figure, save_json
from bundle.limits import check_memory, estimate_memory_bytes, memory_limit_bytes
from bundle.workflows.inference import Reconstruction, input_name, make_geometry, planned_views
from bundle.recon.inferers import METHODS, make_inferer, method_settings, method_slab_size
from bundle.settings import as_bool

__all__ = [
    "Evaluation",
    "TABLE_COLUMNS",
    "NFE_COLUMNS",
    "write_table",
    "plot_table",
    "plot_nfe",
    "select_best",
    "method_label",
    "profile_point",
    "comparison_figures",
    "crop_slices",
]

logger = logging.getLogger(__name__)

TABLE_COLUMNS: tuple[str, ...] = (
    "volume",
    "setting",
    "method",
    "psnr_3d",
    "ssim_3d",
    "mae_body_hu",
    "psnr_axial",
    "psnr_coronal",
    "psnr_sagittal",
    "ssim_axial",
    "ssim_coronal",
    "ssim_sagittal",
    "seconds",
    "nfe",
    "peak_memory_mb",
    "variant",
    "samples",
    "selected",
    "note",
)
NFE_COLUMNS: tuple[str, ...] = (
    "volume", "setting", "method", "steps", "nfe", "seconds", "psnr_3d", "ssim_3d", "mae_body_hu",
    "psnr_coronal", "psnr_sagittal", "peak_memory_mb", "note",
)
SETTING_KEYS = ("views", "arc_degrees", "step_degrees", "photons", "electronic_noise", "beam")


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


def plot_table(rows: Sequence[Mapping[str, Any]], path: str | Path, metrics: Sequence[str] = ("psnr_3d", "ssim_3d", "psnr_coronal", "psnr_sagittal")) -> Path:
    """Grouped bar charts: one panel per metric, settings on the x axis, one bar per method (mean over volumes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(method_label(r) for r in rows))
    metrics = [m for m in metrics if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4 * max(len(metrics), 1), 3.8), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, metric in zip(axes[0], metrics):
        for j, method in enumerate(methods):
            values = [
                np.mean([r[metric] for r in rows if r["setting"] == s and method_label(r) == method and metric in r] or [np.nan])
                for s in settings
            ]
            ax.bar(np.arange(len(settings)) + j * width, values, width, label=method)
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings, fontsize=8, rotation=30, ha="right")
        ax.set_title(metric, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_nfe(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "psnr_3d") -> Path:
    """PSNR against reconstruction time, one line per method, each point (the mean over volumes) labelled with its NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method in dict.fromkeys(r["method"] for r in rows):
        by_nfe: dict[Any, list[Mapping[str, Any]]] = {}
        for r in rows:
            if r["method"] == method and metric in r:
                by_nfe.setdefault(r.get("nfe", r.get("steps")), []).append(r)
        points = sorted(
            (float(np.mean([r["seconds"] for r in group])), float(np.mean([r[metric] for r in group])), nfe)
            for nfe, group in by_nfe.items()
        )
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method)
        for sec, value, nfe in points:
            ax.annotate(str(nfe), (sec, value), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per reconstruction")
    ax.set_ylabel(metric.replace("_", " ").upper().replace("3D", "3D (dB)"))
    ax.set_title("quality against time (labels: NFE)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


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


def method_label(row: Mapping[str, Any]) -> str:
    """A row's method as shown in figures: ``"dbpp"``, or ``"dbpp, mean of 4"`` for a posterior mean."""
    samples = int(row.get("samples", 1) or 1)
    return row["method"] if samples == 1 else f"{row['method']}, mean of {samples}"


def profile_point(truth: np.ndarray, size: int = 5, body_hu: float = -500.0) -> tuple[int, int]:
    """A ``(y, x)`` of high contrast in the ground truth ``(Z, H, W)`` in HU: where the z-mean stands out most above its in-plane neighbourhood.

    Only points inside the body in every slice (above ``body_hu``, with their whole
    neighbourhood) and at least ``size`` voxels from the border count, so the edge of the
    field of view or the air outside cannot win; where none qualifies, every point does. The
    z-profile through the point crosses a structure (typically bone or a contrast-filled
    vessel) in every slice, so slab artefacts and inconsistencies between slices show up as
    jumps along z.
    """
    from scipy.ndimage import minimum_filter, uniform_filter

    truth = np.asarray(truth, dtype=np.float64)
    mean = truth.mean(axis=0)
    contrast = mean - uniform_filter(mean, size=2 * size + 1, mode="nearest")
    allowed = minimum_filter(truth.min(axis=0), size=2 * size + 1, mode="constant", cval=-np.inf) > body_hu
    if allowed.any():
        contrast = np.where(allowed, contrast, -np.inf)
    y, x = np.unravel_index(int(np.argmax(contrast)), contrast.shape)
    return int(y), int(x)


def _load_zhw(path: str | Path) -> np.ndarray:
    """A NIfTI volume in RAS as ``(Z, H, W)`` float32 (its stored values, HU for CT and reconstructions)."""
    from monai.transforms import LoadImage, Orientation

    from bundle.transforms.layout import to_zhw

    image = Orientation(axcodes="RAS")(LoadImage(image_only=True, ensure_channel_first=True)(str(path)))
    return np.ascontiguousarray(to_zhw(torch.as_tensor(image).float()).numpy())


def comparison_figures(
    truth_path: str | Path,
    recon_paths: Sequence[tuple[str, str | Path]],
    output_prefix: str | Path,
    window: tuple[float, float] = (-1000.0, 1000.0),
    diff_range: float = 500.0,
    title: str = "",
) -> list[Path]:
    """Side-by-side figures of reconstructions against the ground truth (same grid, HU).

    Writes ``<prefix>_views.png`` (central axial, coronal and sagittal slices: one column per
    volume, ground truth first, one grey window), ``<prefix>_diff.png`` (reconstruction minus
    ground truth, +-``diff_range`` HU) and ``<prefix>_zprofile.png`` (HU along z at the
    :func:`profile_point` of the ground truth, marked by a cross in the axial views).

    Args:
        truth_path: the ground-truth volume.
        recon_paths: ``(label, path)`` of each reconstruction, on the ground truth's grid.
        output_prefix: path prefix of the PNGs.
        window: HU shown as black and white.
        diff_range: HU at the ends of the difference colour map.
        title: figure title.

    Returns:
        The paths of the three PNGs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = _load_zhw(truth_path)
    recons = [(label, _load_zhw(path)) for label, path in recon_paths]
    for label, volume in recons:
        if volume.shape != truth.shape:
            raise ValueError(f"{label}: reconstruction {volume.shape} is not on the ground truth's grid {truth.shape}")
    py, px = profile_point(truth)
    cuts = orthogonal_cuts(truth.shape)
    prefix = Path(output_prefix)
    paths = []
    for kind, columns in (("views", [("ground truth", truth), *recons]), ("diff", [(lab, v - truth) for lab, v in recons])):
        if not columns:
            continue
        fig, axes = plt.subplots(3, len(columns), figsize=(1.6 * len(columns) + 1.2, 6.0), squeeze=False, layout="constrained")
        for col, (label, volume) in enumerate(columns):
            for row, (name, cut) in enumerate(cuts.items()):
                ax = axes[row, col]
                if kind == "views":
                    shown = ax.imshow(cut(volume), cmap="gray", vmin=window[0], vmax=window[1])
                else:
                    shown = ax.imshow(cut(volume), cmap="RdBu_r", vmin=-diff_range, vmax=diff_range)
                ax.set_aspect("equal" if name == "axial" else "auto")
                if name == "axial":  # the profile point, in the flipped axial display
                    ax.plot([truth.shape[2] - 1 - px], [truth.shape[1] - 1 - py], "+", color="tab:orange", markersize=8)
                ax.set_title(f"{label}: {name}" if row == 0 else name, fontsize=8)
                ax.axis("off")
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.5, label="HU" if kind == "views" else "HU difference")
        fig.suptitle(f"{title} ({'recon - truth' if kind == 'diff' else f'window {window[0]:g}..{window[1]:g} HU'})", fontsize=9)
        paths.append(save_figure(fig, prefix.with_name(f"{prefix.name}_{kind}.png")))

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(truth[:, py, px], "k-", linewidth=2, label="ground truth")
    for label, volume in recons:
        ax.plot(volume[:, py, px], ".-", linewidth=1, markersize=3, label=label)
    ax.set_xlabel("slice (z)")
    ax.set_ylabel("HU")
    ax.set_title(f"{title}: z-profile at (y, x) = ({py}, {px})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(save_figure(fig, prefix.with_name(f"{prefix.name}_zprofile.png")))
    return paths


def crop_slices(path: str | Path, max_slices: int, output_dir: str | Path) -> Path:
    """The central ``max_slices`` axial slices of a NIfTI volume, written to ``output_dir`` under the same name (affine kept consistent).

    Returns ``path`` itself when the volume has no more slices than that.
    """
    import nibabel as nib

    image = nib.load(str(path))
    depth = image.shape[2]
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    if depth <= max_slices:
        return Path(path)
    start = (depth - max_slices) // 2
    out = Path(output_dir) / f"{input_name(path)}.nii.gz"
    with atomic_path(out) as tmp:
        nib.save(image.slicer[:, :, start:start + max_slices], str(tmp))
    return out


def _method_spec(method: str | Mapping[str, Any]) -> dict[str, Any]:
    """``"tv"`` or ``{"method": "tv", "variant": ..., "settings": {...}}`` -> the mapping form."""
    if isinstance(method, str):
        return {"method": method, "variant": "", "settings": {}}
    if "method" not in method:
        raise ValueError(f"a method variant needs a 'method' key, got {dict(method)}")
    settings = dict(method.get("settings") or {})
    variant = str(method.get("variant") or ",".join(f"{k}={v}" for k, v in settings.items()))
    return {"method": str(method["method"]), "variant": variant, "settings": settings}


class Evaluation:
    """Reconstruct every volume with every method under every setting; write one table and figures.

    Args:
        volumes: CT volumes (NIfTI/NRRD/DICOM folders) used as ground truth.
        methods: method names of :func:`bundle.recon.inferers.make_inferer`, or variants
            ``{"method": ..., "variant": ..., "settings": {...}}`` (see the module docstring).
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
        figures: write the comparison figures per volume and setting (:func:`comparison_figures`)
            into ``output_dir/figures``.
        window: HU window of the figures.
        resume: reuse the outputs of cells that already ran with exactly this cell's
            specification (``cell.json`` beside their ``metrics.json``) instead of running them again.
        allow_implausible: passed to each :class:`Reconstruction`.
        memory_limit_gb: the memory limit of every cell (``bundle.limits``); every cell's estimate
            is checked against it before the first one runs.
    """

    def __init__(
        self,
        volumes: Sequence[str | Path],
        methods: Sequence[str | Mapping[str, Any]],
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
        figures: bool = True,
        window: Sequence[float] = (-1000.0, 1000.0),
        resume: bool = False,
        allow_implausible: bool | str = False,
        memory_limit_gb: float | str | None = None,
    ) -> None:
        if not volumes or not methods or not settings:
            raise ValueError("evaluation needs at least one volume, one method and one setting")
        for s in settings:
            unknown = set(s) - set(SETTING_KEYS) - {"name"}
            if unknown:
                raise ValueError(f"setting {dict(s)} has unknown keys {sorted(unknown)}; allowed: {SETTING_KEYS}")
        self.methods = [_method_spec(m) for m in methods]
        for spec in self.methods:
            make_inferer_fn(spec["method"])  # fail early on an unknown method
        self.volumes = [Path(v) for v in volumes]
        missing = [str(v) for v in self.volumes if not v.exists()]
        if missing:
            raise FileNotFoundError(f"evaluation volumes do not exist: {missing}")
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
        self.figures = as_bool(figures, "figures")
        self.window = (float(window[0]), float(window[1]))
        self.resume = as_bool(resume, "resume")
        self.allow_implausible = as_bool(allow_implausible, "allow_implausible")
        self.memory_limit_gb = memory_limit_gb
        self.memory_limit = memory_limit_bytes(memory_limit_gb)
        self._grids: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {}
        self._digests: dict[tuple[str, str], str] = {}

    @staticmethod
    def setting_name(setting: Mapping[str, Any]) -> str:
        """A setting's name: its ``name``, or one made from its values."""
        if setting.get("name"):
            return str(setting["name"])
        return "_".join(f"{k}{setting[k]}" for k in SETTING_KEYS if k in setting) or "default"

    def missing_weights(self, method: str) -> str | None:
        """Why ``method`` cannot run here (its prior's weights file is configured but missing), or None."""
        k = method_slab_size(method, int(self.inferer_settings.get("slab_size", 3)))
        if k is None:
            return None
        ckpt = self.ckpt_path_2d if k == 1 else self.ckpt_path
        if not ckpt:
            return f"skipped: no weights for its slab_size={k} prior ({'ckpt_path_2d' if k == 1 else 'ckpt_path'} is empty)"
        if not Path(ckpt).is_file():
            return f"skipped: no weights for its slab_size={k} prior ({ckpt} not found)"
        return None

    def model_grid(self, volume: Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """The preprocessed volume's ``(Z, H, W)`` shape and voxel size (cached)."""
        from bundle.transforms.layout import to_zhw, voxel_size_zhw

        key = str(volume)
        if key not in self._grids:
            image = self.preprocessing({"image": key})["image"]
            self._grids[key] = (tuple(int(n) for n in to_zhw(image).shape), voxel_size_zhw(image))  # type: ignore[assignment]
        return self._grids[key]

    def check_sizes(self) -> None:
        """Refuse the evaluation before any cell runs when one of its cells exceeds the memory limit (``bundle.limits``)."""
        for volume in self.volumes:
            shape, voxel_size = self.model_grid(volume)
            for setting in self.settings:
                views = planned_views(
                    int(setting.get("views", 8)), float(setting.get("arc_degrees", 180.0)), float(setting.get("step_degrees", 1.0))
                )
                beam = str(setting.get("beam", "parallel"))
                n_det = make_geometry(shape, voxel_size, 1, 180.0, 1.0, beam).sino_shape[2]
                for spec in self.methods:
                    if self.missing_weights(spec["method"]) is not None:
                        continue
                    settings = {**self.inferer_settings, **spec["settings"]}
                    estimate = estimate_memory_bytes(
                        shape,
                        views,
                        n_det,
                        spec["method"],
                        batch_size=int(settings.get("batch_size", 8)),
                        slab_size=int(settings.get("slab_size", 3)),
                        samples=int(settings.get("samples", 1)),
                        projector_matrix=beam != "cone",
                    )
                    what = f"evaluation cell {input_name(volume)} | {self.setting_name(setting)} | {spec['method']} ({shape[0]} x {shape[1]} x {shape[2]} grid, {views} views)"
                    check_memory(estimate, what, self.memory_limit)

    def _digest(self, kind: str, path: Path) -> str:
        """SHA-256 of a weights file (``kind="weights"``) or of a volume after preprocessing (``"volume"``), cached."""
        key = (kind, str(path))
        if key not in self._digests:
            if kind == "volume":
                image = np.ascontiguousarray(np.asarray(self.preprocessing({"image": str(path)})["image"], dtype=np.float32))
                sha = hashlib.sha256(repr(image.shape).encode())
                sha.update(image.tobytes())
                self._digests[key] = sha.hexdigest()
            else:
                self._digests[key] = file_sha256(path)
        return self._digests[key]

    def cell_spec(
        self, volume: Path, method: str, inferer_settings: Mapping[str, Any], samples: int, acquisition: Mapping[str, Any]
    ) -> dict[str, Any]:
        """What determines a cell's result: written as ``cell.json``, compared on ``resume``."""
        k = method_slab_size(method, int(self.inferer_settings.get("slab_size", 3)))
        ckpt = None if k is None else (self.ckpt_path_2d if k == 1 else self.ckpt_path)
        taken = method_settings(method, dict(inferer_settings)) if method in METHODS else dict(inferer_settings)
        settings = {key: value for key, value in taken.items() if key != "progress"}  # what changes the result
        spec = {
            "volume": str(volume),
            "volume_sha256": self._digest("volume", volume),
            "method": method,
            "inferer_settings": settings,
            "samples": samples,
            "acquisition": dict(acquisition),
            "seed": self.seed,
            "hu_max": self.hu_max,
            "weights_sha256": self._digest("weights", Path(ckpt)) if ckpt else None,
            # a prior without a weights file (an in-memory network) cannot be identified: never reused
            "reusable": k is None or bool(ckpt),
        }
        return json.loads(json.dumps(spec, default=str))  # as it reads back from cell.json

    @staticmethod
    def _finished(out_dir: Path, recon_path: Path, spec: Mapping[str, Any]) -> dict[str, Any] | None:
        """The metrics of a cell that already ran with ``spec`` in ``out_dir`` and left ``recon_path``, or None."""
        if not spec["reusable"]:
            return None
        try:
            if json.loads((out_dir / "cell.json").read_text()) != spec:
                return None
            metrics = json.loads((out_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        return metrics if recon_path.is_file() else None

    def run(self) -> list[dict[str, Any]]:
        """Run every cell; write ``results.csv``, ``results.json``, ``results.png`` and the figures; return the rows."""
        self.check_sizes()
        rows: list[dict[str, Any]] = []
        for volume in self.volumes:
            for setting in self.settings:
                label = self.setting_name(setting)
                acquisition = {k: setting[k] for k in SETTING_KEYS if k in setting}
                for spec in self.methods:
                    method, variant = spec["method"], spec["variant"]
                    row: dict[str, Any] = {
                        "volume": input_name(volume), "setting": label, "method": method, "variant": variant, **acquisition
                    }
                    reason = self.missing_weights(method)
                    if reason is not None:
                        logger.warning("%s | %s | %s: %s", input_name(volume), label, method, reason)
                        rows.append({**row, "note": reason})
                        continue
                    folder = method + (f"_{variant}".replace(" ", "_") if variant else "")
                    out_dir = self.output_dir / input_name(volume) / label.replace(" ", "_").replace(",", "") / folder
                    inferer_settings = {**self.inferer_settings, **spec["settings"], "seed": self.seed}
                    samples = int(inferer_settings.pop("samples", 1))
                    row["samples"] = samples
                    recon_path = out_dir / f"{input_name(volume)}_recon.nii.gz"
                    cell = self.cell_spec(volume, method, inferer_settings, samples, acquisition)
                    metrics = self._finished(out_dir, recon_path, cell) if self.resume else None
                    if metrics is not None:
                        logger.info("reusing %s | %s | %s %s from %s", input_name(volume), label, method, variant, out_dir)
                    else:
                        logger.info("evaluating %s | %s | %s %s", input_name(volume), label, method, variant)
                        (out_dir / "cell.json").unlink(missing_ok=True)  # the outputs below are about to change
                        metrics = self._run_cell(volume, out_dir, method, inferer_settings, samples, acquisition)
                        save_json(cell, out_dir / "cell.json")
                    row.update({k: v for k, v in metrics.items() if k not in ("geometry", "inferer", "input")})
                    row.update(method=method, note="", recon_path=str(recon_path))
                    rows.append(row)
                    write_table(select_best(rows), self.output_dir)  # keep a partial table if a later cell fails
                if self.figures:
                    self._figures(volume, label, rows)
        write_table(select_best(rows), self.output_dir)
        plot_table([r for r in rows if r["selected"]], self.output_dir / "results.png")
        return rows

    def _run_cell(
        self,
        volume: Path,
        out_dir: Path,
        method: str,
        inferer_settings: Mapping[str, Any],
        samples: int,
        acquisition: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Reconstruct one cell into ``out_dir``; its metrics."""
        return Reconstruction(
            input_path=volume,
            output_dir=out_dir,
            preprocessing=self.preprocessing,
            inferer=self.make_inferer_fn(method, **inferer_settings),
            network=self.network,
            ckpt_path=self.ckpt_path,
            network_2d=self.network_2d,
            ckpt_path_2d=self.ckpt_path_2d,
            seed=self.seed,
            samples=samples,
            device=self.device,
            hu_max=self.hu_max,
            allow_implausible=self.allow_implausible,
            memory_limit_gb=self.memory_limit_gb,
            **acquisition,
        ).run()

    def _figures(self, volume: Path, setting: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """The comparison figures of one volume and setting (the selected variant of each method that ran)."""
        name = input_name(volume)
        cell = select_best([dict(r) for r in rows if r["volume"] == name and r["setting"] == setting])
        shown = [(method_label(r), r["recon_path"]) for r in cell if r["selected"] and r.get("recon_path")]
        if not shown or not volume.is_file():
            return
        prefix = self.output_dir / "figures" / f"{name}_{setting.replace(' ', '_').replace(',', '')}"
        comparison_figures(volume, shown, prefix, window=self.window, title=f"{name}, {setting}")
