"""Figures a radiologist can read: HU window presets, true aspect, orientation letters, colour bars.

Every view figure of the bundle (inference's ``<name>_views.png``, the evaluation's
``*_views.png`` / ``*_views_bone.png`` / ``*_diff.png`` / ``*_zprofile.png`` of
:func:`comparison_figures`) is drawn here, from ``(Z, Y, X)`` RAS volumes in HU and their voxel
size ``(dz, dy, dx)`` in mm:

- a window is a preset name (:data:`WINDOWS`: ``soft_tissue`` W400/L40, ``lung`` W1500/L-600,
  ``bone`` W2000/L500, ``wide`` W2000/L0) or ``"W/L"`` in HU, e.g. ``"350/50"``;
- each cut is shown with its extent in mm (:func:`cut_extent`), so a 0.7 x 0.7 x 5 mm series is
  not stretched 7 times in coronal and sagittal;
- orientation letters (:data:`ORIENTATION`) at the edges, in the radiological convention of
  :func:`bundle.io.orthogonal_cuts`;
- the ground truth, the reconstruction, the difference and the std (with samples) side by side,
  the first two in one window, a colour bar in HU for each kind of panel (:func:`draw_panels`);
- a z-profile through a high-contrast point of the ground truth (:func:`profile_point`), where
  slab artefacts and inconsistencies between slices show as jumps along z.

The benchmark charts (:func:`plot_table`, :func:`plot_nfe`) carry units and y axes fitted to the
values, so differences of a few tenths of a dB show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.io import orthogonal_cuts, save_figure

__all__ = [
    "ORIENTATION", "WINDOWS", "axial_position", "comparison_figures", "cut_extent", "draw_cut", "draw_panels", "draw_views",
    "load_hu", "metric_label", "plot_nfe", "plot_table", "profile_point", "value_limits", "views_figure", "window_range",
    "zprofile_figure",
]

WINDOWS: dict[str, tuple[float, float]] = {  # (width, level) in HU
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (2000.0, 500.0),
    "wide": (2000.0, 0.0),
}

# (top, bottom, left, right) letters of each cut of bundle.io.orthogonal_cuts.
ORIENTATION: dict[str, tuple[str, str, str, str]] = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


def window_range(window: str | Sequence[float]) -> tuple[float, float]:
    """``(black, white)`` HU of a window: a preset name, ``"W/L"``, or a ``(width, level)`` pair.

    Raises:
        ValueError: naming the ``window`` setting, for an unknown preset or a width <= 0.
    """
    if isinstance(window, str):
        if window in WINDOWS:
            width, level = WINDOWS[window]
        else:
            try:
                width, level = (float(part) for part in window.split("/"))
            except ValueError:
                raise ValueError(
                    f"window {window!r}: not one of {', '.join(WINDOWS)} nor 'width/level' in HU (e.g. '400/40')"
                ) from None
    else:
        width, level = (float(v) for v in window)
    if not width > 0:
        raise ValueError(f"window {window!r}: the width must be > 0 HU")
    return level - width / 2, level + width / 2


def cut_extent(name: str, shape: Sequence[int], voxel_size: Sequence[float]) -> tuple[float, float, float, float]:
    """``imshow`` extent ``(left, right, bottom, top)`` in mm of a cut of a ``(Z, Y, X)`` volume.

    With this extent and ``aspect="equal"`` a millimetre is as long across as down, whatever the
    voxel size: the height of a coronal cut is ``Z * dz``, its width ``X * dx``.
    """
    (nz, ny, nx), (dz, dy, dx) = shape, voxel_size
    width, height = {"axial": (nx * dx, ny * dy), "coronal": (nx * dx, nz * dz), "sagittal": (ny * dy, nz * dz)}[name]
    return (0.0, float(width), 0.0, float(height))


def draw_cut(ax: Any, image: np.ndarray, name: str, voxel_size: Sequence[float], shape: Sequence[int],
             letters: bool = True, **imshow: Any) -> Any:
    """Show one cut on ``ax`` at its true aspect, with its orientation letters; returns the image artist."""
    shown = ax.imshow(image, extent=cut_extent(name, shape, voxel_size), aspect="equal", interpolation="nearest", **imshow)
    if letters:
        top, bottom, left, right = ORIENTATION[name]
        style = dict(color="yellow", fontsize=7, fontweight="bold", transform=ax.transAxes)
        ax.text(0.5, 0.98, top, ha="center", va="top", **style)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
        ax.text(0.02, 0.5, left, ha="left", va="center", **style)
        ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def views_figure(columns: Sequence[tuple[str, np.ndarray]], voxel_size: Sequence[float], path: str | Path,
                 **options: Any) -> Path:
    """:func:`draw_views` written to the PNG ``path`` (atomically)."""
    return save_figure(draw_views(columns, voxel_size, **options), path)


def draw_views(
    columns: Sequence[tuple[str, np.ndarray]],
    voxel_size: Sequence[float],
    window: str | Sequence[float] = "soft_tissue",
    truth: np.ndarray | None = None,
    std: np.ndarray | Sequence[tuple[str, np.ndarray]] | None = None,
    diff_range: float = 200.0,
    title: str = "",
) -> Any:
    """A figure of the central axial, coronal and sagittal cuts of each volume in HU, one column each, in one window.

    With ``truth``, it comes first and every column gets a difference column (volume - truth,
    +-``diff_range`` HU); with ``std`` (the per-voxel standard deviation of the samples, HU) a
    last column shows it from 0 to its 99th percentile. Each kind of panel has a colour bar in HU.

    Args:
        columns: ``(label, volume)`` of the reconstructions, ``(Z, Y, X)`` RAS, HU.
        voxel_size: ``(dz, dy, dx)`` in mm.
        window: the grey window (:func:`window_range`).
        truth: the ground truth on the same grid, or ``None``.
        std: the samples' standard deviation on the same grid, or ``(label, std)`` pairs of several
            reconstructions, or ``None``.
        diff_range: HU at the ends of the difference colour map.
        title: figure title (the window is appended).
    """
    panels = [("ground truth", truth, "grey")] if truth is not None else []
    panels += [(label, volume, "grey") for label, volume in columns]
    if truth is not None:
        for label, volume in columns:
            if volume.shape != truth.shape:
                raise ValueError(f"{label}: shape {volume.shape} is not the grid of the ground truth {truth.shape}")
        panels += [(f"{label} - truth", volume - truth, "diff") for label, volume in columns]
    stds = [("std of the samples", std)] if isinstance(std, np.ndarray) else list(std or [])
    panels += [(label, volume, "std") for label, volume in stds]
    return draw_panels(panels, voxel_size, window, diff_range, title)


PANEL_STYLES = ("grey", "diff", "std")
_BAR_LABELS = {"grey": "HU", "diff": "HU difference", "std": "HU (std)"}


def draw_panels(
    panels: Sequence[tuple[str, np.ndarray, str]],
    voxel_size: Sequence[float],
    window: str | Sequence[float] = "soft_tissue",
    diff_range: float = 200.0,
    title: str = "",
    point: tuple[int, int] | None = None,
) -> Any:
    """The central axial, coronal and sagittal cuts of each ``(label, volume, kind)`` panel, one column each.

    ``kind`` is ``"grey"`` (HU in ``window``), ``"diff"`` (+-``diff_range`` HU) or ``"std"`` (0 to the
    99th percentile of every std panel); each kind present gets one colour bar. ``point``, a
    ``(y, x)`` voxel, is marked with a cross in the axial cuts (the z-profile's line).

    Raises:
        ValueError: the volumes are not on one grid, or a kind is unknown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = window_range(window)
    shape = panels[0][1].shape
    for label, volume, kind in panels:
        if volume.shape != shape:
            raise ValueError(f"{label}: shape {volume.shape} is not the grid of the other volumes {shape}")
        if kind not in PANEL_STYLES:
            raise ValueError(f"{label}: panel kind {kind!r} is not one of {PANEL_STYLES}")
    stds = [volume for _, volume, kind in panels if kind == "std"]
    std_max = float(np.percentile(np.stack(stds), 99)) if stds else 1.0
    style = {"grey": dict(cmap="gray", vmin=low, vmax=high), "diff": dict(cmap="RdBu_r", vmin=-diff_range, vmax=diff_range),
             "std": dict(cmap="magma", vmin=0.0, vmax=max(std_max, 1e-6))}
    cuts = orthogonal_cuts(shape)
    heights = [(top - bottom) / (right - left) for left, right, bottom, top in (cut_extent(n, shape, voxel_size) for n in cuts)]
    height = min(max(2.0 * sum(heights) + 2.0, 4.0), 14.0)  # rows as tall as their cuts: no gaps around flat ones
    fig, axes = plt.subplots(3, len(panels), figsize=(2.0 * len(panels) + 1.0, height), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": heights})
    artists: dict[str, Any] = {}
    for col, (label, volume, kind) in enumerate(panels):
        for row, (name, cut) in enumerate(cuts.items()):
            artists[kind] = draw_cut(axes[row, col], cut(volume), name, voxel_size, shape, **style[kind])
            axes[row, col].set_title(f"{label}: {name}" if row == 0 else name, fontsize=7)
        if point is not None:
            axes[0, col].plot(*axial_position(point, shape, voxel_size), "+", color="tab:orange", markersize=8)
    for kind, artist in artists.items():
        fig.colorbar(artist, ax=[axes[r, c] for c in range(len(panels)) if panels[c][2] == kind for r in range(3)],
                     shrink=0.6, label=_BAR_LABELS[kind], location="bottom")
    if "grey" in artists:
        title = f"{title} (window W{high - low:g} / L{(low + high) / 2:g} HU)"
    elif "diff" in artists:
        title = f"{title} (reconstruction - ground truth, +-{diff_range:g} HU)"
    fig.suptitle(title.strip(), fontsize=9)
    return fig


def axial_position(point: tuple[int, int], shape: Sequence[int], voxel_size: Sequence[float]) -> tuple[float, float]:
    """Where voxel ``(y, x)`` lies in an axial cut drawn by :func:`draw_cut`: ``(x, y)`` in mm of its extent.

    The axial cut shows the patient's right on the left and anterior at the top (both axes flipped).
    """
    (y, x), (_, ny, nx), (_, dy, dx) = point, shape, voxel_size
    return (nx - 1 - x + 0.5) * dx, (y + 0.5) * dy


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


def zprofile_figure(truth: np.ndarray, columns: Sequence[tuple[str, np.ndarray]], point: tuple[int, int],
                    voxel_size: Sequence[float], path: str | Path, title: str = "") -> Path:
    """HU along z at voxel ``point`` = ``(y, x)`` of the ground truth and of each ``(label, volume)``, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (py, px), dz = point, float(voxel_size[0])
    z_mm = np.arange(truth.shape[0]) * dz
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(z_mm, truth[:, py, px], "k-", linewidth=2, label="ground truth")
    for label, volume in columns:
        ax.plot(z_mm, volume[:, py, px], ".-", linewidth=1, markersize=3, label=label)
    ax.set_xlabel(f"z (mm; slices of {dz:g} mm)")
    ax.set_ylabel("HU")
    ax.set_title(f"{title}: z-profile at (y, x) = ({py}, {px})".lstrip(": "), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def load_hu(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume in RAS as ``(Z, Y, X)`` float32 (its stored values: HU for CT and reconstructions) and its voxel size ``(dz, dy, dx)`` mm."""
    import torch
    from monai.transforms import LoadImage, Orientation

    from bundle.transforms.layout import to_zhw, voxel_size_zhw

    image = Orientation(axcodes="RAS", labels=None)(LoadImage(image_only=True, ensure_channel_first=True)(str(path)))
    return np.ascontiguousarray(to_zhw(torch.as_tensor(image).float()).numpy()), voxel_size_zhw(image)


def comparison_figures(
    truth_path: str | Path,
    shown: Sequence[tuple[str, str | Path, str | Path | None]],
    output_prefix: str | Path,
    window: str | Sequence[float] = "soft_tissue",
    diff_range: float = 200.0,
    title: str = "",
) -> list[Path]:
    """Reconstructions against their ground truth (files on one grid, HU), as four PNGs.

    ``<prefix>_views.png``: the ground truth and each reconstruction in ``window``, and the std of
    each posterior mean that has one; ``<prefix>_views_bone.png``: the same in the bone window (spine,
    ribs); ``<prefix>_diff.png``: each reconstruction minus the ground truth (+-``diff_range`` HU);
    ``<prefix>_zprofile.png``: HU along z at the :func:`profile_point` of the ground truth (the
    cross in the axial cuts).

    Args:
        truth_path: the ground-truth volume.
        shown: ``(label, reconstruction path, std path or None)`` of each reconstruction.
        output_prefix: path prefix of the PNGs.
        window: the grey window of ``_views.png`` (:func:`window_range`).
        diff_range: HU at the ends of the difference colour map.
        title: figure title.

    Raises:
        ValueError: a reconstruction is not on the ground truth's grid.
    """
    truth, voxel_size = load_hu(truth_path)
    recons = [(label, load_hu(path)[0]) for label, path, _ in shown]
    stds = [(f"std of {label}", load_hu(std)[0]) for label, _, std in shown if std is not None]
    for label, volume in recons + stds:
        if volume.shape != truth.shape:
            raise ValueError(f"{label}: reconstruction {volume.shape} is not on the ground truth's grid {truth.shape}")
    point = profile_point(truth)
    views = [("ground truth", truth, "grey"), *((label, v, "grey") for label, v in recons), *((label, v, "std") for label, v in stds)]
    diffs = [(f"{label} - truth", volume - truth, "diff") for label, volume in recons]
    prefix = Path(output_prefix)
    figures = {"views": (views, window), "views_bone": (views, "bone"), "diff": (diffs, window)}
    paths = [
        save_figure(draw_panels(panels, voxel_size, win, diff_range, title, point), prefix.with_name(f"{prefix.name}_{kind}.png"))
        for kind, (panels, win) in figures.items()
    ]
    paths.append(zprofile_figure(truth, recons, point, voxel_size, prefix.with_name(f"{prefix.name}_zprofile.png"), title))
    return paths


METRIC_UNITS = {"psnr": "dB", "ssim": "", "mae_body_hu": "HU", "seconds": "s"}


def metric_label(metric: str) -> str:
    """``"psnr_coronal"`` -> ``"PSNR coronal (dB)"``; ``"ssim_3d"`` -> ``"SSIM 3D"``; ``"mae_body_hu"`` -> ``"body MAE (HU)"``."""
    if metric == "mae_body_hu":
        return "body MAE (HU)"
    kind, _, where = metric.partition("_")
    unit = METRIC_UNITS.get(kind, "")
    name = f"{kind.upper()} {where.replace('3d', '3D')}".strip()
    return f"{name} ({unit})" if unit else name


def value_limits(values: Sequence[float], pad: float = 0.15) -> tuple[float, float] | None:
    """y limits around the finite ``values`` (``pad`` of their range on each side), not from 0; ``None`` if none is finite."""
    finite = [float(v) for v in values if np.isfinite(v)]
    if not finite:
        return None
    low, high = min(finite), max(finite)
    margin = pad * (high - low) if high > low else max(abs(high) * 0.01, 1e-3)
    return low - margin, high + margin


def plot_table(rows: Sequence[Mapping[str, Any]], path: str | Path, method_label: Any,
               metrics: Sequence[str] = ("psnr_3d", "ssim_3d", "psnr_coronal", "psnr_sagittal", "mae_body_hu")) -> Path:
    """Grouped bars, one panel per metric (with its unit): settings on x, one bar per method (mean over volumes).

    Each panel's y axis spans the values shown, so a 0.3 dB difference is visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(method_label(r) for r in rows))
    metrics = [m for m in metrics if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4.2 * max(len(metrics), 1), 3.8), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, metric in zip(axes[0], metrics):
        shown = []
        for j, method in enumerate(methods):
            values = [
                np.mean([r[metric] for r in rows if r["setting"] == s and method_label(r) == method and metric in r] or [np.nan])
                for s in settings
            ]
            ax.bar(np.arange(len(settings)) + j * width, values, width, label=method)
            shown += values
        limits = value_limits(shown)
        if limits:
            ax.set_ylim(*limits)
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings, fontsize=8, rotation=30, ha="right")
        ax.set_ylabel(metric_label(metric), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_nfe(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "psnr_3d") -> Path:
    """``metric`` against reconstruction time, one line per method, each point (mean over volumes) labelled with its NFE."""
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
    ax.set_ylabel(metric_label(metric))
    ax.set_title("quality against time (labels: NFE)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
