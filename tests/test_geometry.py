"""Geometry value objects: factories, shapes, JSON round trip, equality, repr, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bundle.physics.geometry import (
    ConeBeamGeometry,
    FanBeamGeometry,
    ParallelBeamGeometry,
    from_dict,
    limited_angle,
    load_json,
    sparse_view,
)

BEAMS = ["parallel", "fan", "cone"]


@pytest.mark.parametrize("beam", BEAMS)
def test_json_round_trip(tmp_path, beam):
    g = sparse_view(8, (4, 32, 30), (2.5, 0.8, 0.8), beam=beam)
    path = tmp_path / "geometry.json"
    g.to_json(path)
    assert load_json(path) == g
    assert from_dict(g.to_dict()) == g
    assert type(g).load_json(path) == g


@pytest.mark.parametrize("beam", BEAMS)
def test_repr_rebuilds(beam):
    g = limited_angle(90, 1, (3, 16, 16), (1.0, 0.5, 0.5), beam=beam)
    assert eval(repr(g)) == g  # noqa: S307 - the contract under test
    assert hash(eval(repr(g))) == hash(g)  # noqa: S307


def test_equality_tolerance():
    g = sparse_view(4, (2, 16, 16))
    assert g == g.replace(det_spacing=g.det_spacing * (1 + 1e-9))
    assert g != g.replace(det_spacing=g.det_spacing * 1.01)
    assert g != g.replace(det_count=g.det_count + 1)
    assert g != sparse_view(4, (2, 16, 16), beam="fan")


def test_sparse_view_parallel():
    g = sparse_view(8, (5, 256, 256), (1.0, 1.0, 1.0))
    assert isinstance(g, ParallelBeamGeometry)
    assert g.det_count == math.ceil(math.sqrt(2) * 256)
    assert g.sino_shape == (5, 8, g.det_count)
    np.testing.assert_allclose(g.angles, np.arange(8) * np.pi / 8)


@pytest.mark.parametrize("beam", ["fan", "cone"])
def test_sparse_view_full_circle_and_fov(beam):
    g = sparse_view(6, (4, 64, 64), (2.0, 1.0, 1.0), beam=beam)
    np.testing.assert_allclose(g.angles, np.arange(6) * 2 * np.pi / 6)
    # detector half-width, scaled back to the axis, covers the field of view
    mag = (g.source_origin + g.origin_det) / g.source_origin
    cols = g.det_count if beam == "fan" else g.det_shape[1]
    spacing = g.det_spacing if beam == "fan" else g.det_spacing[1]
    assert 0.5 * cols * spacing / mag >= g.fov_radius
    if beam == "cone":
        assert isinstance(g, ConeBeamGeometry)
        assert g.sino_shape == (g.det_shape[0], 6, g.det_shape[1])
        assert g.det_shape[0] * g.det_spacing[0] / mag >= 4 * 2.0
    else:
        assert isinstance(g, FanBeamGeometry)


def test_limited_angle():
    g = limited_angle(90, 1, (2, 16, 16))
    assert g.n_views == 90
    assert math.isclose(g.angles[-1], math.radians(89))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vol_shape=(2, 16)), "vol_shape"),
        (dict(vol_shape=(2, 0, 16)), "vol_shape"),
        (dict(voxel_size=(1.0, -1.0, 1.0)), "voxel_size"),
        (dict(angles=()), "angles"),
        (dict(angles=(0.0, float("nan"))), "angles"),
        (dict(det_count=0), "det_count"),
        (dict(det_spacing=0.0), "det_spacing"),
    ],
)
def test_validation(kwargs, match):
    base = dict(vol_shape=(2, 16, 16), voxel_size=(1.0, 1.0, 1.0), angles=(0.0, 1.0), det_count=23, det_spacing=1.0)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ParallelBeamGeometry(**base)


def test_factory_validation():
    with pytest.raises(ValueError, match="n_views"):
        sparse_view(0, (2, 16, 16))
    with pytest.raises(ValueError, match="beam"):
        sparse_view(4, (2, 16, 16), beam="helical")
    with pytest.raises(ValueError, match="field of view"):
        sparse_view(4, (2, 512, 512), beam="fan", source_origin=100.0)
    with pytest.raises(ValueError, match="step_degrees"):
        limited_angle(10, 20, (2, 16, 16))
    with pytest.raises(ValueError, match="beam"):
        from_dict({"beam": "helical"})
    with pytest.raises(ValueError, match="missing"):
        from_dict({"beam": "parallel", "vol_shape": [1, 2, 3]})
