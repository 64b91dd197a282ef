"""The acquisition value object: one rule from the settings to the geometry, settings checked by name."""

from __future__ import annotations

import pytest
import torch

from bundle.physics.acquisition import Acquisition, make_geometry, planned_views
from bundle.physics.geometry import limited_angle, sparse_view
from bundle.physics.operators import make_operator
from bundle.physics.simulation import simulate_sinogram


def test_one_rule_from_settings_to_geometry():
    grid, voxel = (4, 16, 16), (3.0, 3.0, 3.0)
    assert Acquisition(views=6).geometry(grid, voxel) == sparse_view(6, grid, voxel)
    limited = Acquisition(views=6, arc_degrees=90.0, step_degrees=10.0)
    assert limited.limited_angle and limited.n_views == 9 == limited.geometry(grid, voxel).n_views
    assert limited.geometry(grid, voxel) == limited_angle(90.0, 10.0, grid, voxel)
    assert Acquisition(views=5, beam="fan").geometry(grid, voxel) == make_geometry(grid, voxel, 5, beam="fan")
    assert planned_views(8, 180.0) == Acquisition().n_views == 8
    assert Acquisition().detector_bins(grid, voxel) == sparse_view(1, grid, voxel).det_count


def test_settings_are_read_and_checked_by_name():
    a = Acquisition(views="4", arc_degrees="120", photons="null", electronic_noise="0")  # as the command line gives them
    assert (a.views, a.arc_degrees, a.photons, a.electronic_noise) == (4, 120.0, None, 0.0)
    assert Acquisition(photons="1e5").photons == 1e5
    for settings, message in [
        ({"views": 0}, "views must be an integer >= 1"),
        ({"arc_degrees": 400}, "arc_degrees must be a number > 0 and <= 360"),
        ({"step_degrees": 0}, "step_degrees must be a number > 0"),
        ({"photons": -5}, "photons must be a number > 0"),
        ({"electronic_noise": -1}, "electronic_noise must be a number >= 0"),
        ({"beam": "pencil"}, "beam must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            Acquisition(**settings)


def test_simulate_is_the_physics_simulation():
    a = Acquisition(views=4, photons=1e4)
    geometry = a.geometry((2, 8, 8), (1.0, 1.0, 1.0))
    op = make_operator(geometry)
    x = torch.full(geometry.vol_shape, 0.3)
    got = a.simulate(x, op, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, simulate_sinogram(x, op, 1e4, 0.0, torch.Generator().manual_seed(3)), rtol=0, atol=0)
