"""Figures: window presets, true aspect from the voxel size, orientation letters, units (issue 16)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bundle.workflows.figures import (  # noqa: E402
    ORIENTATION, cut_extent, draw_views, metric_label, plot_table, value_limits, views_figure, window_range,
)


def test_window_presets_and_width_level():
    assert window_range("soft_tissue") == (-160.0, 240.0)
    assert window_range("lung") == (-1350.0, 150.0)
    assert window_range("bone") == (-500.0, 1500.0)
    assert window_range("350/50") == (-125.0, 225.0)
    assert window_range((100, 0)) == (-50.0, 50.0)
    with pytest.raises(ValueError, match="window 'brain'"):
        window_range("brain")
    with pytest.raises(ValueError, match="width must be > 0"):
        window_range("0/40")


def test_extent_follows_the_voxel_size():
    shape, voxel = (40, 512, 512), (5.0, 0.7, 0.7)  # a thick-slice DICOM series
    assert cut_extent("axial", shape, voxel) == pytest.approx((0, 358.4, 0, 358.4))
    left, right, bottom, top = cut_extent("coronal", shape, voxel)
    assert (right - left, top - bottom) == pytest.approx((358.4, 200.0))  # not stretched to a square
    assert cut_extent("sagittal", shape, voxel)[1] == pytest.approx(358.4)


def test_views_apply_the_window_aspect_letters_and_colour_bars(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.normal(40, 50, size=(6, 20, 16)).astype(np.float32)
    recon, std = truth + 10, np.full_like(truth, 5.0)
    fig = draw_views([("dbpp", recon)], (3.0, 1.0, 2.0), window="bone", truth=truth, std=std, diff_range=100)
    images = [(ax, ax.images[0]) for ax in fig.axes if ax.images]
    assert len(images) == 3 * 4  # truth, recon, difference, std; three cuts each
    grey = [im for ax, im in images if im.get_cmap().name == "gray"]
    assert len(grey) == 6 and all(im.get_clim() == (-500.0, 1500.0) for im in grey)
    assert all(im.get_clim() == (-100.0, 100.0) for _, im in images if im.get_cmap().name == "RdBu_r")
    for ax, im in images:
        name = ax.get_title().split(": ")[-1]
        assert tuple(im.get_extent()) == pytest.approx(cut_extent(name, truth.shape, (3.0, 1.0, 2.0)))
        assert ax.get_aspect() == 1.0
        assert {t.get_text() for t in ax.texts} == set(ORIENTATION[name])
    bars = [ax for ax in fig.axes if not ax.images and ax.get_xlabel() in ("HU", "HU difference", "HU (std)")]
    assert {ax.get_xlabel() for ax in bars} == {"HU", "HU difference", "HU (std)"}
    plt.close(fig)
    assert views_figure([("dbpp", recon)], (3.0, 1.0, 2.0), tmp_path / "v.png", truth=truth).stat().st_size > 0
    with pytest.raises(ValueError, match="not the grid"):
        draw_views([("bad", recon[:-1])], (3.0, 1.0, 2.0), truth=truth)


def test_charts_have_units_and_show_small_differences(tmp_path):
    assert metric_label("psnr_coronal") == "PSNR coronal (dB)"
    assert metric_label("ssim_3d") == "SSIM 3D"
    assert metric_label("mae_body_hu") == "body MAE (HU)"
    low, high = value_limits([30.1, 30.4])
    assert 29.9 < low < 30.1 and 30.4 < high < 30.6  # not from 0: 0.3 dB fills the axis
    rows = [{"setting": "8 views", "method": m, "psnr_3d": v, "mae_body_hu": 60.0 + v} for m, v in (("tv", 30.1), ("dbpp", 30.4))]
    assert plot_table(rows, tmp_path / "t.png", method_label=lambda r: r["method"]).stat().st_size > 0
