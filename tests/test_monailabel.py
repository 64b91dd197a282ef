"""The MONAI Label integration: a real MONAI Label server on 127.0.0.1 serving the bundle (issue 4).

The session fixtures make the isolated label environment (``scripts/make_label_env.sh``, a
no-op when it is up to date), write a temporary studies folder (a crop of the shipped sample,
a sinogram simulated from it by the bundle with its geometry JSON, and a 2D image), start
``python -m bundle.monailabel`` from ``.venv-label`` on a free port and stop it (its whole
process group) at the end. Requests go over HTTP with bounded timeouts.

Reconstructions with the diffusion prior need the shipped ``models/model.pt``; they run with
few DDIM steps (data consistency does the rest) and must beat FBP at the same views.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.geometry import sparse_view
from bundle.metrics import psnr
from bundle.operators import make_operator
from bundle.physics import MU_WATER, hu_to_normalized, simulate_sinogram
from bundle.transforms.sinogram import save_sinogram

pytestmark = [pytest.mark.slow, pytest.mark.label]

ROOT = Path(__file__).resolve().parents[1]
LABEL_PYTHON = ROOT / ".venv-label" / "bin" / "python"
SAMPLE = ROOT / "sample" / "sample_ct.nii.gz"
MODEL = ROOT / "models" / "model.pt"

VIEWS = 8
STEPS = 10  # DDIM steps of the diffusion requests: few, the data consistency carries them
SLICES = slice(14, 26)  # 12 axial slices of the sample, full in-plane size (122 x 101, 3 mm)
HU_MAX = 2000.0  # configs/inference.json: HU mapped to 1
MU_MAX = MU_WATER * (1.0 + HU_MAX / 1000.0)

ENV_TIMEOUT = 1800  # first creation downloads about 1 GB of wheels
START_TIMEOUT = 240
REQUEST_TIMEOUT = 600

TIMINGS: dict[str, float] = {}


def _network() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _env_works() -> bool:
    if not LABEL_PYTHON.exists():
        return False
    check = [str(LABEL_PYTHON), "-c", "import monailabel.interfaces.app, bundle"]
    return subprocess.run(check, cwd=ROOT, capture_output=True, timeout=300).returncode == 0


@pytest.fixture(scope="session")
def label_env() -> Path:
    """``.venv-label`` up to date (made by ``scripts/make_label_env.sh``), or a skip when it cannot be made."""
    start = time.perf_counter()
    try:
        run = subprocess.run(
            ["bash", "scripts/make_label_env.sh"], cwd=ROOT, capture_output=True, text=True, timeout=ENV_TIMEOUT
        )
        ok, log = run.returncode == 0, run.stdout + run.stderr
    except subprocess.TimeoutExpired as err:
        ok, log = False, f"timed out after {ENV_TIMEOUT} s: {err}"
    TIMINGS["label_env_s"] = time.perf_counter() - start
    if not ok:
        if _env_works():  # an older environment that still works (e.g. offline after a pin change)
            print(f"make_label_env.sh failed; using the existing .venv-label:\n{log[-2000:]}")
        elif not _network():
            pytest.skip("no network and no working .venv-label: cannot install monailabel (run `make label` once online)")
        else:
            pytest.fail(f"scripts/make_label_env.sh failed:\n{log[-4000:]}")
    return LABEL_PYTHON


def _zhw(volume_xyz: np.ndarray) -> torch.Tensor:
    """NIfTI ``(X, Y, Z)`` -> the package's ``(Z, H, W)``."""
    return torch.as_tensor(np.ascontiguousarray(volume_xyz.transpose(2, 1, 0)), dtype=torch.float32)


@pytest.fixture(scope="session")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A studies folder: ``ct`` (sample crop, HU), ``sino`` + ``sino.json`` (simulated, 8 views), ``flat`` (2D)."""
    folder = tmp_path_factory.mktemp("studies")
    ct = nib.load(str(SAMPLE)).slicer[:, :, SLICES]
    nib.save(ct, str(folder / "ct.nii.gz"))

    x = hu_to_normalized(_zhw(np.asarray(ct.dataobj, dtype=np.float32)), MU_WATER, MU_MAX).clamp(max=1.0)
    dx, dy, dz = (float(v) for v in ct.header.get_zooms()[:3])
    geometry = sparse_view(VIEWS, tuple(x.shape), (dz, dy, dx))
    y = simulate_sinogram(x, make_operator(geometry), generator=torch.Generator().manual_seed(0), mu_max=MU_MAX)
    save_sinogram(folder / "sino.nii.gz", y, geometry)  # and sino.json beside it

    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), str(folder / "flat.nii.gz"))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Server:
    """A running MONAI Label server: its base URL, log file and request helpers."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def infer(self, task: str, image: str, output: str = "image", **params: object) -> tuple[int, bytes, float]:
        """``POST /infer/<task>?image=<image>&output=<output>`` with ``params``: status, body, seconds."""
        query = urllib.parse.urlencode({"image": image, "output": output})
        body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
        request = urllib.request.Request(f"{self.url}/infer/{task}?{query}", data=body, method="POST")
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as r:
                status, content = r.status, r.read()
        except urllib.error.HTTPError as err:
            status, content = err.code, err.read()
        return status, content, time.perf_counter() - start

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture(scope="session")
def server(label_env: Path, studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``python -m bundle.monailabel`` on 127.0.0.1 (its default host) and a free port; stopped at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [str(label_env), "-m", "bundle.monailabel", "--studies", str(studies), "--port", str(port)]
    cmd += ["--conf", "steps", str(STEPS), "--conf", "views", str(VIEWS)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the MONAI Label server exited with {proc.returncode}:\n{srv.tail()}")
            try:
                if _get(f"{srv.url}/info/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the MONAI Label server did not answer within {START_TIMEOUT} s:\n{srv.tail()}")
            time.sleep(1.0)
        TIMINGS["server_start_s"] = time.perf_counter() - start
        yield srv
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        print("\nMONAI Label test timings (s): " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


def _nifti(content: bytes, path: Path) -> nib.Nifti1Image:
    path.write_bytes(content)
    return nib.load(str(path))


def _normalized(image: nib.Nifti1Image) -> torch.Tensor:
    """An image in HU as normalised attenuation ``(Z, H, W)``, clipped to [0, 1] as the bundle's metrics use."""
    return hu_to_normalized(_zhw(np.asarray(image.dataobj, dtype=np.float32)), MU_WATER, MU_MAX).clamp(0.0, 1.0)


def _reconstruct(server: Server, task: str, image: str, out: Path, **params: object) -> nib.Nifti1Image:
    status, content, seconds = server.infer(task, image, **params)
    TIMINGS[f"{task}_{params.get('method', 'default')}_s"] = seconds
    assert status == 200, f"{task} {params}: HTTP {status}: {content[:500]!r}\n{server.tail()}"
    return _nifti(content, out)


def _need_model() -> None:
    if not MODEL.is_file():
        pytest.skip(f"{MODEL.relative_to(ROOT)} (the shipped prior) is not there yet: diffusion requests need it")


def test_info(server: Server) -> None:
    status, content = _get(f"{server.url}/info/")
    assert status == 200
    info = json.loads(content)
    assert set(info["models"]) >= {"sparse_view_ct", "sinogram_ct"}
    for task in ("sparse_view_ct", "sinogram_ct"):
        assert info["models"][task]["type"] == "others"
        assert info["models"][task]["dimension"] == 3
        assert info["models"][task]["config"]["method"][0] == "dbpp"
    assert info["models"]["sparse_view_ct"]["config"]["views"] == VIEWS
    assert info["models"]["sparse_view_ct"]["config"]["steps"] == STEPS
    assert "views" not in info["models"]["sinogram_ct"]["config"]  # the geometry JSON fixes the views


def test_sparse_view_ct_keeps_the_study_grid(server: Server, studies: Path, tmp_path: Path) -> None:
    study = nib.load(str(studies / "ct.nii.gz"))
    recon = _reconstruct(server, "sparse_view_ct", "ct", tmp_path / "fbp.nii.gz", method="fbp")
    assert recon.shape == study.shape
    np.testing.assert_allclose(recon.affine, study.affine, atol=1e-4)
    np.testing.assert_allclose(recon.header.get_zooms()[:3], study.header.get_zooms()[:3], rtol=1e-5)


def test_sparse_view_ct_beats_fbp(server: Server, studies: Path, tmp_path: Path) -> None:
    _need_model()
    study = nib.load(str(studies / "ct.nii.gz"))
    truth = _normalized(study)
    fbp = _reconstruct(server, "sparse_view_ct", "ct", tmp_path / "fbp.nii.gz", method="fbp", views=VIEWS)
    dbpp = _reconstruct(server, "sparse_view_ct", "ct", tmp_path / "dbpp.nii.gz", method="dbpp", views=VIEWS, seed=0)
    assert dbpp.shape == study.shape
    np.testing.assert_allclose(dbpp.affine, study.affine, atol=1e-4)
    psnr_fbp, psnr_dbpp = psnr(_normalized(fbp), truth), psnr(_normalized(dbpp), truth)
    print(f"\nsparse_view_ct, {VIEWS} views: PSNR fbp {psnr_fbp:.2f} dB, dbpp ({STEPS} steps) {psnr_dbpp:.2f} dB")
    assert psnr_dbpp > psnr_fbp


def test_sinogram_ct(server: Server, studies: Path, tmp_path: Path) -> None:
    study = nib.load(str(studies / "ct.nii.gz"))
    fbp = _reconstruct(server, "sinogram_ct", "sino", tmp_path / "fbp.nii.gz", method="fbp")
    assert fbp.shape == study.shape  # the geometry's grid: the volume the sinogram was simulated from
    np.testing.assert_allclose(fbp.header.get_zooms()[:3], study.header.get_zooms()[:3], rtol=1e-5)
    _need_model()
    truth = _normalized(study)
    dbpp = _reconstruct(server, "sinogram_ct", "sino", tmp_path / "dbpp.nii.gz", method="dbpp", seed=0)
    assert dbpp.shape == study.shape
    np.testing.assert_allclose(dbpp.affine, fbp.affine, atol=1e-4)
    psnr_fbp, psnr_dbpp = psnr(_normalized(fbp), truth), psnr(_normalized(dbpp), truth)
    print(f"\nsinogram_ct, {VIEWS} views: PSNR fbp {psnr_fbp:.2f} dB, dbpp ({STEPS} steps) {psnr_dbpp:.2f} dB")
    assert psnr_dbpp > psnr_fbp


def test_samples_give_the_posterior_mean(server: Server) -> None:
    """``samples`` N: N reconstructions with seeds seed..seed+N-1, their mean returned (issue 3, item 6)."""
    _need_model()
    status, content, _ = server.infer("sparse_view_ct", "ct", output="json", method="dbpp", views=VIEWS, steps=2, samples=2)
    assert status == 200, f"HTTP {status}: {content[:500]!r}\n{server.tail()}"
    answer = json.loads(content)
    assert answer["settings"]["samples"] == 2
    assert answer["metrics"]["samples"] == 2 and answer["metrics"]["nfe"] == 4


@pytest.mark.parametrize(
    ("task", "image", "params", "status", "words"),
    [
        ("sparse_view_ct", "ct", {"method": "nope"}, 400, "unknown method 'nope'"),
        ("sparse_view_ct", "ct", {"views": 0}, 400, "views must be >= 1"),
        ("sparse_view_ct", "ct", {"views": -3}, 400, "views must be >= 1"),
        ("sparse_view_ct", "ct", {"views": "eight"}, 400, "views must be an integer"),
        ("sparse_view_ct", "ct", {"arc_degrees": 400}, 400, "arc_degrees must be a number in (0, 360]"),
        ("sparse_view_ct", "ct", {"steps": 0}, 400, "steps must be >= 1"),
        ("sparse_view_ct", "ct", {"samples": 0}, 400, "samples must be >= 1"),
        ("sparse_view_ct", "ct", {"samples": 17}, 400, "samples must be <= 16"),
        ("sparse_view_ct", "ct", {"warm_start": 1.0}, 400, "warm_start must be a number in [0, 1)"),
        ("sparse_view_ct", "ct", {"device": "tpu"}, 400, "device"),
        ("sparse_view_ct", "flat", {"method": "fbp"}, 422, "expected a 3D volume"),
        ("sparse_view_ct", "missing", {}, 404, "not found"),
        ("sinogram_ct", "ct", {"method": "fbp"}, 422, "no geometry JSON"),
        ("sinogram_ct", "sino", {"method": "nope"}, 400, "unknown method"),
    ],
)
def test_bad_requests_get_http_errors(
    server: Server, task: str, image: str, params: dict, status: int, words: str, tmp_path: Path
) -> None:
    got, content, _ = server.infer(task, image, **params)
    assert got == status, f"{task} {image} {params}: HTTP {got}: {content[:500]!r}"
    detail = json.loads(content)["detail"]
    assert words in detail, detail
    assert str(tmp_path.parent) not in detail  # no server paths in messages
    # the server keeps serving: a good request right after the bad one
    recon = _reconstruct(server, "sparse_view_ct", "ct", tmp_path / "after.nii.gz", method="fbp")
    assert recon.ndim == 3


def test_read_only_typo_stops_the_app(label_env: Path, studies: Path, tmp_path: Path) -> None:
    """``--conf read_only ture`` must not fall back to allowing uploads: the app refuses to start."""
    code = (
        "import sys; from bundle.monailabel.main import DiffusionBlendCTApp; "
        "DiffusionBlendCTApp(sys.argv[1], sys.argv[2], {'read_only': 'ture'})"
    )
    done = subprocess.run(
        [str(label_env), "-c", code, str(tmp_path), str(studies)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "read_only must be true or false, got 'ture'" in done.stderr


def test_studies_folder_is_read_only(server: Server, studies: Path) -> None:
    """Uploads (where MONAI Label 0.8.5 builds paths from client input) are refused by default."""
    boundary = "----dbct"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.nii.gz\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + (studies / "flat.nii.gz").read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{server.url}/datastore/?image=..%2Fescaped",
        data=body,
        method="PUT",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 403
    assert "read-only" in json.loads(err.value.read())["detail"]
    assert not (studies.parent / "escaped.nii.gz").exists()


def _outward_ipv4() -> str | None:
    """This machine's address on its default route (a UDP connect sends no packet), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # TEST-NET-1: only selects the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_binds_loopback_only(server: Server) -> None:
    """The launcher's default host is 127.0.0.1: the port is closed on the machine's other address."""
    address = _outward_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to test against")
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection((address, port), timeout=5).close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
