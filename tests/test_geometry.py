"""Geometry value objects: factories, shapes, JSON round trip, equality, repr, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bundle.physics.geometry import (
    ConeBeamGeometry,
    FanBeamGeometry,
    ParallelBeamGeometry,
    SourceGrid,
    from_dict,
    limited_angle,
    load_json,
    load_source_grid,
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


# -- the optional "source" block: where the geometry's volume lies in the world (issue 16) ------------

#: An oblique, flipped affine of a (X, Y, Z) = (30, 32, 4) grid with spacing (0.8, 0.8, 2.5).
_ROTATION = np.array([[0.0, -1.0, 0.0], [math.cos(0.3), 0.0, -math.sin(0.3)], [math.sin(0.3), 0.0, math.cos(0.3)]])
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _ROTATION @ np.diag([0.8, 0.8, 2.5])
OBLIQUE[:3, 3] = [12.0, -130.5, 40.25]


@pytest.mark.parametrize("beam", BEAMS)
def test_source_grid_round_trip(tmp_path, beam):
    g = sparse_view(8, (4, 32, 30), (2.5, 0.8, 0.8), beam=beam)
    source = SourceGrid(OBLIQUE, (30, 32, 4))
    np.testing.assert_allclose(source.spacing, (0.8, 0.8, 2.5))
    path = tmp_path / "geometry.json"
    g.to_json(path, source=source)
    block = json.loads(path.read_text())["source"]
    assert block["shape"] == [30, 32, 4] and np.allclose(block["spacing"], [0.8, 0.8, 2.5])
    assert load_json(path) == g  # the geometry itself is unchanged by the block
    assert load_source_grid(path) == source
    np.testing.assert_array_equal(np.asarray(load_source_grid(path).affine), OBLIQUE)


def test_json_without_source_block_has_none(tmp_path):
    """Geometry JSONs written before the block existed still load, with no source grid."""
    g = sparse_view(8, (4, 32, 30), (2.5, 0.8, 0.8))
    g.to_json(tmp_path / "old.json")
    assert "source" not in json.loads((tmp_path / "old.json").read_text())
    assert load_json(tmp_path / "old.json") == g and load_source_grid(tmp_path / "old.json") is None


@pytest.mark.parametrize(
    ("shape", "affine", "match"),
    [
        ((30, 32, 5), OBLIQUE, r"source grid \(shape \[30, 32, 5\].*is not the geometry's grid"),
        ((32, 30, 4), OBLIQUE, r"vol_shape \[4, 32, 30\] reversed: \[30, 32, 4\]"),
        ((30, 32, 4), np.diag([0.8, 0.8, 3.0, 1.0]), r"spacing \[0.8, 0.8, 3.0\].*voxel_size reversed: \[0.8, 0.8, 2.5\]"),
    ],
)
def test_source_grid_must_be_the_geometry_grid(tmp_path, shape, affine, match):
    g = sparse_view(8, (4, 32, 30), (2.5, 0.8, 0.8))
    with pytest.raises(ValueError, match=match):
        g.to_json(tmp_path / "g.json", source=SourceGrid(affine, shape))
    assert not (tmp_path / "g.json").exists()
    # a hand-edited block is refused on reading, naming the file
    d = g.to_dict()
    d["source"] = SourceGrid(affine, shape).to_dict()
    (tmp_path / "edited.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"edited\.json: the source grid"):
        load_source_grid(tmp_path / "edited.json")


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"shape": [30, 32, 4]}, "needs 'affine' and 'shape'"),
        ({"affine": np.eye(3).tolist(), "shape": [30, 32, 4]}, "finite 4 x 4 matrix"),
        ({"affine": "identity", "shape": [30, 32, 4]}, "finite 4 x 4 matrix"),
        ({"affine": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], "shape": [30, 32, 4]}, "last row"),
        ({"affine": np.diag([1.0, 1.0, 0.0, 1.0]).tolist(), "shape": [30, 32, 4]}, "singular"),
        ({"affine": OBLIQUE.tolist(), "shape": [30, 32, 4], "spacing": [1, 1, 1]}, "differs from the affine's column lengths"),
        ({"affine": OBLIQUE.tolist(), "shape": [30, 32, 4], "origin": [0, 0, 0]}, r"unknown fields \['origin'\]"),
        ({"affine": OBLIQUE.tolist(), "shape": [30, 32, 0]}, "source shape"),
    ],
)
def test_invalid_source_block_names_the_file(tmp_path, block, match):
    d = sparse_view(8, (4, 32, 30), (2.5, 0.8, 0.8)).to_dict()
    d["source"] = block
    (tmp_path / "scan.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match) as err:
        load_source_grid(tmp_path / "scan.json")
    assert "scan.json" in str(err.value)
