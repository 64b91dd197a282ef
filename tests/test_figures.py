"""Figures: window presets, true aspect from the voxel size, orientation letters, units (issue 16)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bundle.workflows.figures import (  # noqa: E402
    ORIENTATION, axial_position, comparison_figures, cut_extent, draw_panels, draw_views, load_hu, metric_label, plot_table,
    profile_point, value_limits, views_figure, window_range,
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


def test_panels_mark_the_profile_point_where_the_voxel_is_drawn():
    shape, voxel = (4, 10, 8), (3.0, 1.0, 2.0)
    volume = np.zeros(shape, dtype=np.float32)
    volume[:, 2, 5] = 1000.0  # one bright line along z at (y, x) = (2, 5)
    fig = draw_panels([("truth", volume, "grey")], voxel, window="bone", point=(2, 5))
    ax = fig.axes[0]
    (x_mm,), (y_mm,) = ax.lines[0].get_data()
    image = ax.images[0]
    left, right, bottom, top = image.get_extent()
    col = int((x_mm - left) / (right - left) * image.get_array().shape[1])
    row = int((top - y_mm) / (top - bottom) * image.get_array().shape[0])
    assert image.get_array()[row, col] == 1000.0  # the cross sits on the bright voxel of the flipped axial cut
    assert (x_mm, y_mm) == pytest.approx(axial_position((2, 5), shape, voxel))
    plt.close(fig)
    with pytest.raises(ValueError, match="panel kind 'gray'"):
        draw_panels([("truth", volume, "gray")], voxel)


def test_several_std_columns_share_one_colour_scale():
    truth = np.zeros((4, 8, 8), dtype=np.float32)
    fig = draw_views([("a", truth), ("b", truth)], (2.0, 1.0, 1.0), truth=truth,
                     std=[("std of a", np.full_like(truth, 3.0)), ("std of b", np.full_like(truth, 9.0))])
    std_images = [ax.images[0] for ax in fig.axes if ax.images and ax.images[0].get_cmap().name == "magma"]
    assert len(std_images) == 6 and {im.get_clim() for im in std_images} == {(0.0, 9.0)}
    plt.close(fig)


def test_profile_point_finds_the_bright_structure_inside_the_body():
    truth = np.full((5, 40, 40), -1000.0)
    truth[:, 8:32, 6:34] = 40.0  # the body
    truth[:, 15, 22] = 1000.0  # a bone inside it
    truth[:, 0, 5] = 3000.0  # a bright border artefact in the air
    truth[:, 9, 7] = 2000.0  # bright, but its neighbourhood leaves the body
    assert profile_point(truth) == (15, 22)
    assert profile_point(np.full((3, 8, 8), -1000.0)) == (0, 0)  # no body: falls back to every point


def test_comparison_figures_of_files_on_one_grid(tmp_path):
    import nibabel as nib

    from tests.conftest import write_crop

    truth_path = write_crop(tmp_path / "ct.nii.gz", xy=24, slices=5)
    image = nib.load(str(truth_path))
    recon = np.asarray(image.dataobj, dtype=np.float32) + 20.0
    nib.save(nib.Nifti1Image(recon, image.affine), str(tmp_path / "recon.nii.gz"))
    nib.save(nib.Nifti1Image(np.full_like(recon, 4.0), image.affine), str(tmp_path / "std.nii.gz"))
    truth, voxel = load_hu(truth_path)
    assert truth.shape == (5, 24, 24) and voxel == pytest.approx((3.0, 3.0, 3.0))
    paths = comparison_figures(truth_path, [("dbpp", tmp_path / "recon.nii.gz", tmp_path / "std.nii.gz")],
                               tmp_path / "fig", window="lung", title="ct")
    assert [p.name for p in paths] == ["fig_views.png", "fig_views_bone.png", "fig_diff.png", "fig_zprofile.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    nib.save(nib.Nifti1Image(recon[:, :, :4], image.affine), str(tmp_path / "short.nii.gz"))
    with pytest.raises(ValueError, match="not on the ground truth's grid"):
        comparison_figures(truth_path, [("short", tmp_path / "short.nii.gz", None)], tmp_path / "bad")
