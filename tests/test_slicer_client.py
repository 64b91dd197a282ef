"""The 3D Slicer module's REST client (slicer/DiffusionBlendRecon) against the real MONAI Label server (issue 16).

The client (``DiffusionBlendReconLib.client``, standard library only) is what the Slicer
module runs; here it runs outside Slicer against ``python -m bundle.monailabel`` on 127.0.0.1,
started by the ``server`` fixture of tests/test_monailabel.py on this module's own studies
folder: a tiny CT crop and a sinogram simulated from it whose geometry JSON records the CT's
grid (``save_sinogram(..., source=ct)``). Covered: the task listing, reconstructions of a study
and of an uploaded file (a NIfTI on the study's grid), the server's error messages, the
non-blocking call (a worker thread, a callback), and that the client needs nothing but the
standard library (Slicer's Python has no MONAI).
"""

from __future__ import annotations

import ast
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.physics.geometry import sparse_view
from bundle.physics.operators import make_operator
from bundle.physics.simulation import MU_WATER, hu_to_normalized, simulate_sinogram
from bundle.transforms.sinogram import save_sinogram
from tests.conftest import write_crop
from tests.test_monailabel import MU_MAX, REQUEST_TIMEOUT, STEPS, VIEWS, WRONG_KIND, Server, label_env, server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "slicer" / "DiffusionBlendRecon"
sys.path.insert(0, str(MODULE_DIR))

from DiffusionBlendReconLib.client import (  # noqa: E402
    Client,
    ServerError,
    ServerUnreachable,
    Task,
    encode_multipart,
    parse_multipart,
)

@pytest.fixture(scope="session")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ct`` (a 32 x 32 x 8 crop of the sample, HU) and ``sino`` + ``sino.json`` (8 views of it, the CT's grid recorded)."""
    folder = tmp_path_factory.mktemp("slicer_studies")
    ct = nib.load(str(write_crop(folder / "ct.nii.gz")))
    x = hu_to_normalized(torch.as_tensor(np.asarray(ct.dataobj, np.float32).transpose(2, 1, 0).copy()), MU_WATER, MU_MAX)
    dx, dy, dz = (float(v) for v in ct.header.get_zooms()[:3])
    geometry = sparse_view(VIEWS, tuple(x.shape), (dz, dy, dx))
    y = simulate_sinogram(x.clamp(0.0, 1.0), make_operator(geometry), mu_max=MU_MAX)
    save_sinogram(folder / "sino.nii.gz", y, geometry, source=ct)
    return folder


@pytest.fixture(scope="module")
def client(server: Server) -> Client:
    return Client(server.url, timeout=REQUEST_TIMEOUT, info_timeout=REQUEST_TIMEOUT)


# -- the client alone ----------------------------------------------------------------------------


def test_client_needs_only_the_standard_library():
    """Slicer's Python has neither MONAI nor this bundle: the client imports the standard library only (Python 3.9+)."""
    lib = MODULE_DIR / "DiffusionBlendReconLib"
    for path in (lib / "client.py", lib / "__init__.py"):
        tree = ast.parse(path.read_text(), feature_version=(3, 9))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert imported <= set(sys.stdlib_module_names) | {"__future__"}, (path.name, imported - set(sys.stdlib_module_names))
    module = ast.parse((MODULE_DIR / "DiffusionBlendRecon.py").read_text(), feature_version=(3, 9))
    classes = {n.name for n in module.body if isinstance(n, ast.ClassDef)}
    # the names Slicer's scripted module factory looks for
    assert {"DiffusionBlendRecon", "DiffusionBlendReconWidget", "DiffusionBlendReconLogic", "DiffusionBlendReconTest"} <= classes


def test_multipart_round_trip_is_binary_safe(tmp_path):
    payload = bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\n\r\n" + b"\x00\r\n"
    (tmp_path / "x.nii.gz").write_bytes(payload)
    body, content_type = encode_multipart({"params": '{"views": 8}'}, {"file": tmp_path / "x.nii.gz"})
    parts = parse_multipart(body, content_type)
    assert parts["params"] == (None, b'{"views": 8}')
    assert parts["file"] == ("x.nii.gz", payload)
    with pytest.raises(ValueError, match="without a boundary"):
        parse_multipart(body, "multipart/form-data")


def test_unreachable_server_says_how_to_start_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    with pytest.raises(ServerUnreachable, match=rf"cannot reach the MONAI Label server at http://127.0.0.1:{port}.*bundle.monailabel"):
        Client(f"http://127.0.0.1:{port}", info_timeout=5).info()
    with pytest.raises(ValueError, match="http:// or https://"):
        Client("127.0.0.1:8000")


def test_request_settings_are_typed_by_their_defaults():
    task = Task("sparse_view_ct", "", {"method": ["dbpp", "fbp"], "steps": 10, "eta": 0.0, "photons": "", "views": 8})
    entered = {"method": "fbp", "steps": "3", "eta": "0.5", "photons": "1e5", "views": "8"}
    assert task.request_settings(entered) == {"method": "fbp", "steps": 3, "eta": 0.5, "photons": 100000.0}
    assert task.request_settings({"method": "dbpp", "steps": "", "photons": "null"}) == {"photons": None}
    for bad, words in (({"steps": "x"}, "steps must be an integer, got 'x'"), ({"method": "nope"}, "method must be one of"),
                       ({"eta": "high"}, "eta must be a number"), ({"seed": "1"}, "has no setting 'seed'")):
        with pytest.raises(ValueError, match=words):
            task.request_settings(bad)


# -- against the real server ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.label
def test_lists_the_reconstruction_tasks_and_studies(client: Client):
    tasks = client.tasks()
    assert set(tasks) == {"sparse_view_ct", "sinogram_ct"}
    sparse, sino = tasks["sparse_view_ct"], tasks["sinogram_ct"]
    assert sparse.default("method") == "dbpp" and "fbp" in sparse.settings["method"]
    assert sparse.default("views") == VIEWS and sparse.default("steps") == STEPS  # the server's --conf values
    assert "views" not in sino.settings  # the geometry JSON fixes the views
    assert "sinogram" in sino.description
    assert client.studies() == ["ct", "sino"]
    # the server's settings, sent back as a form would, are valid requests
    assert sparse.request_settings({"method": "fbp", "steps": "2"}) == {"method": "fbp", "steps": 2}


@pytest.mark.slow
@pytest.mark.label
def test_reconstructs_a_study_on_its_grid(client: Client, studies: Path, tmp_path: Path):
    ct = nib.load(str(studies / "ct.nii.gz"))
    result = client.reconstruct("sparse_view_ct", study="ct", settings={"method": "fbp"}, output_dir=tmp_path)
    assert result.path.parent == tmp_path and result.path.name.startswith("ct_sparse_view_ct_fbp")
    recon = nib.load(str(result.path))
    assert recon.shape == ct.shape
    np.testing.assert_allclose(recon.affine, ct.affine, atol=1e-4)
    assert result.info["task"] == "sparse_view_ct" and result.info["settings"] == {"method": "fbp"}
    assert result.info["metrics"]["psnr_3d"] > 10  # the server compares with the study itself

    # the same volume uploaded from this machine (Slicer's "Volume in the scene") gives the same image
    mine = shutil.copy(studies / "ct.nii.gz", tmp_path / "mine.nii.gz")
    uploaded = client.reconstruct("sparse_view_ct", file=mine, settings={"method": "fbp"}, output_dir=tmp_path / "up")
    assert uploaded.image == "mine.nii.gz" and uploaded.path.name.startswith("mine_sparse_view_ct_fbp")
    again = nib.load(str(uploaded.path))
    np.testing.assert_allclose(again.affine, ct.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(recon.dataobj))


@pytest.mark.slow
@pytest.mark.label
def test_sinogram_ct_result_has_the_ct_shape(client: Client, studies: Path, tmp_path: Path):
    ct = nib.load(str(studies / "ct.nii.gz"))
    result = client.reconstruct("sinogram_ct", study="sino", settings={"method": "fbp"}, output_dir=tmp_path)
    recon = nib.load(str(result.path))
    assert recon.shape == ct.shape
    np.testing.assert_allclose(recon.header.get_zooms()[:3], ct.header.get_zooms()[:3], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.label
def test_sinogram_ct_result_overlays_the_source_ct(client: Client, studies: Path, tmp_path: Path):
    """sino.json records the CT's grid: the reconstruction has the CT's affine, so Slicer overlays the two."""
    ct = nib.load(str(studies / "ct.nii.gz"))
    result = client.reconstruct("sinogram_ct", study="sino", settings={"method": "fbp"}, output_dir=tmp_path)
    np.testing.assert_allclose(nib.load(str(result.path)).affine, ct.affine, atol=1e-4)


@pytest.mark.slow
@pytest.mark.label
@pytest.mark.parametrize(
    ("task", "study", "settings", "status", "words"),
    [
        ("sinogram_ct", "ct", {"method": "fbp"}, 422, WRONG_KIND["ct"]),
        ("sparse_view_ct", "sino", {"method": "fbp"}, 422, WRONG_KIND["sino"]),
        ("sparse_view_ct", "ct", {"method": "nope"}, 400, "unknown method 'nope'"),
        ("sparse_view_ct", "ct", {"views": 0}, 400, "views must be >= 1, got 0"),
        ("sparse_view_ct", "missing", {}, 404, "study 'missing' not found"),
        ("nope", "ct", {}, 404, "unknown task 'nope'"),
    ],
)
def test_server_errors_carry_the_servers_message(client: Client, task, study, settings, status, words, tmp_path):
    with pytest.raises(ServerError) as err:
        client.reconstruct(task, study=study, settings=settings, output_dir=tmp_path)
    assert err.value.status == status, err.value
    assert words in err.value.detail, err.value.detail
    assert str(err.value).startswith(f"HTTP {status} from {client.server_url}/infer/{task}")
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
@pytest.mark.label
def test_reconstruct_async_runs_in_a_worker_and_calls_back(client: Client, studies: Path, tmp_path: Path):
    """What the Slicer module relies on: the call returns at once, the request runs in another thread, a callback reports it."""
    caller = threading.get_ident()
    seen: dict = {}
    finished = threading.Event()

    def callback(job):
        seen.update(thread=threading.get_ident(), done=job.done(), error=job.error)
        finished.set()

    start = time.perf_counter()
    job = client.reconstruct_async("sparse_view_ct", study="ct", settings={"method": "sirt"}, output_dir=tmp_path, callback=callback)
    returned_after = time.perf_counter() - start
    assert returned_after < 0.5 and not job.done()  # the server has not answered yet: the caller is free
    ticks = 0
    while not finished.is_set() and time.perf_counter() - start < REQUEST_TIMEOUT:
        ticks += 1  # the caller's loop keeps running meanwhile (Slicer: its event loop and the module's timer)
        time.sleep(0.05)
    assert finished.is_set(), "no callback within the request timeout"
    assert ticks > 1
    assert seen["thread"] != caller and seen["thread"] == job.thread.ident and seen["done"] and seen["error"] is None
    assert job.error is None and job.seconds is not None and job.seconds >= returned_after
    recon = nib.load(str(job.result.path))
    assert recon.shape == nib.load(str(studies / "ct.nii.gz")).shape and job.result.info["settings"]["method"] == "sirt"

    # an error reaches the callback through the job, the thread does not swallow it
    failed = threading.Event()
    bad = client.reconstruct_async("sinogram_ct", study="ct", output_dir=tmp_path / "bad", callback=lambda j: failed.set())
    assert failed.wait(REQUEST_TIMEOUT)
    assert isinstance(bad.error, ServerError) and bad.error.status == 422 and bad.result is None


@pytest.mark.slow
@pytest.mark.label
def test_download_study(client: Client, studies: Path, tmp_path: Path):
    path = client.download_study("ct", tmp_path)
    assert path.parent == tmp_path and path.name.endswith(".nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj), np.asarray(nib.load(str(studies / "ct.nii.gz")).dataobj))
    with pytest.raises(ServerError) as err:
        client.download_study("missing", tmp_path)
    assert err.value.status == 404

