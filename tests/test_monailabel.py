"""The MONAI Label integration: a real MONAI Label server on 127.0.0.1 serving the bundle (issue 4).

The session fixtures make the isolated label environment (``scripts/make_label_env.sh``, a
no-op when it is up to date), write a temporary studies folder (a crop of the shipped sample,
a sinogram simulated from it by the bundle with its geometry JSON, and a 2D image), start
``python -m bundle.monailabel`` from ``.venv-label`` on a free port and stop it (its whole
process group) at the end. Requests go over HTTP with bounded timeouts.

Reconstructions with the diffusion prior need the shipped ``models/model.pt``; they run with
few DDIM steps (data consistency does the rest) and must beat FBP at the same views.

Bad requests (issue 14): each task refuses the other kind of study, every numeric setting has
a range, the size guard refuses requests whose memory estimate exceeds the server's limit
(``--conf memory_limit_gb``, :data:`MEMORY_LIMIT_GB` here) before allocating anything, and an
unknown task or a ``params`` field that is not a JSON object gets a 4xx; after each, a good
request shows that the server keeps serving.
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

from bundle.physics.geometry import sparse_view
from bundle.metrics import psnr
from bundle.physics.operators import make_operator
from bundle.physics.simulation import MU_WATER, hu_to_normalized, simulate_sinogram
from bundle.transforms.sinogram import save_sinogram

pytestmark = [pytest.mark.slow, pytest.mark.label]

ROOT = Path(__file__).resolve().parents[1]
LABEL_PYTHON = ROOT / ".venv-label" / "bin" / "python"
SAMPLE = ROOT / "sample" / "sample_ct.nii.gz"
MODEL = ROOT / "models" / "model.pt"

VIEWS = 8
MEMORY_LIMIT_GB = 16  # the server's size guard limit: fixed, so that the refusals below do not depend on the machine
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

    def post(self, path: str, data: bytes, content_type: str) -> tuple[int, bytes]:
        """``POST <path>`` with a raw body: status and body."""
        request = urllib.request.Request(
            f"{self.url}{path}", data=data, method="POST", headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture(scope="session")
def server(label_env: Path, studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``python -m bundle.monailabel`` on 127.0.0.1 (its default host) and a free port; stopped at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [str(label_env), "-m", "bundle.monailabel", "--studies", str(studies), "--port", str(port)]
    cmd += ["--conf", "steps", str(STEPS), "--conf", "views", str(VIEWS)]
    cmd += ["--conf", "memory_limit_gb", str(MEMORY_LIMIT_GB)]
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
        assert info["models"][task]["config"]["support"] == ["hull", "none"]
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


#: What each task answers to a study of the other kind.
WRONG_KIND = {
    "sino": "study sino.nii.gz is a sinogram (its geometry JSON sino.json lies beside it); "
    "sparse_view_ct takes CT volumes: use the sinogram_ct task",
    "ct": "study ct.nii.gz has no geometry JSON, so it is a CT volume; "
    "sinogram_ct takes sinograms: use the sparse_view_ct task",
}


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
        ("sparse_view_ct", "ct", {"warm_start": -0.1}, 400, "warm_start must be a number in [0, 1)"),
        ("sparse_view_ct", "ct", {"device": "tpu"}, 400, "device"),
        ("sparse_view_ct", "ct", {"support": "mask"}, 400, "unknown support 'mask'; choose one of ['none', 'hull']"),
        # the caps of every numeric setting (issue 14)
        ("sparse_view_ct", "ct", {"views": 3601}, 400, "views must be <= 3600, got 3601"),
        ("sparse_view_ct", "ct", {"arc_degrees": 90, "step_degrees": 0.02}, 400, "gives 4500 views, more than 3600"),
        ("sparse_view_ct", "ct", {"arc_degrees": 0}, 400, "arc_degrees must be a number in (0, 360]"),
        ("sparse_view_ct", "ct", {"step_degrees": 0}, 400, "step_degrees must be a number in (0, 360]"),
        ("sparse_view_ct", "ct", {"photons": 0}, 400, "photons must be a number in (0, 1e+12]"),
        ("sparse_view_ct", "ct", {"photons": 1e13}, 400, "photons must be a number in (0, 1e+12]"),
        ("sparse_view_ct", "ct", {"steps": 1001}, 400, "steps must be <= 1000"),
        ("sparse_view_ct", "ct", {"eta": 1.5}, 400, "eta must be a number in [0, 1]"),
        ("sparse_view_ct", "ct", {"batch_size": 0}, 400, "batch_size must be >= 1"),
        ("sparse_view_ct", "ct", {"batch_size": 257}, 400, "batch_size must be <= 256"),
        ("sparse_view_ct", "ct", {"seed": -1}, 400, "seed must be >= 0"),
        ("sparse_view_ct", "ct", {"seed": 2**31}, 400, "seed must be <= 2147483647"),
        ("sinogram_ct", "sino", {"steps": 5000}, 400, "steps must be <= 1000"),
        ("sinogram_ct", "sino", {"batch_size": 1e6}, 400, "batch_size must be <= 256"),
        ("sparse_view_ct", "flat", {"method": "fbp"}, 422, "expected a 3D volume"),
        ("sparse_view_ct", "missing", {}, 404, "not found"),
        # each task takes only its kind of study (issue 14)
        ("sparse_view_ct", "sino", {"method": "fbp"}, 422, WRONG_KIND["sino"]),
        ("sinogram_ct", "ct", {"method": "fbp"}, 422, WRONG_KIND["ct"]),
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


@pytest.mark.parametrize(
    ("params", "setting"),
    [({"views": 1e9}, "views=1000000000"), ({"arc_degrees": 90, "step_degrees": 1e-9}, "step_degrees=1e-09")],
)
def test_size_guard_refuses_huge_requests(server: Server, params: dict, setting: str, tmp_path: Path) -> None:
    """``{"views": 1e9}`` grew the server to 23 GB until the kernel killed it: now a 422 with the estimate and the limit."""
    status, content, seconds = server.infer("sparse_view_ct", "ct", **params)
    TIMINGS[f"size_guard_{setting}_s"] = seconds
    assert status == 422, f"{params}: HTTP {status}: {content[:500]!r}\n{server.tail()}"
    detail = json.loads(content)["detail"]
    assert setting in detail and "study ct.nii.gz" in detail, detail
    assert "needs an estimated" in detail and f"more than the limit of {MEMORY_LIMIT_GB:.1f} GB" in detail, detail
    assert "memory_limit_gb" in detail, detail  # what to change
    recon = _reconstruct(server, "sparse_view_ct", "ct", tmp_path / "after.nii.gz", method="fbp")
    assert recon.ndim == 3


@pytest.mark.parametrize(
    ("task", "params", "status", "words"),
    [
        ("nope", "{}", 404, "unknown task 'nope'; this server's tasks are ['sinogram_ct', 'sparse_view_ct']"),
        ("sparse_view_ct", "{views: 8", 400, "params must be a JSON object such as {\"views\": 8}; it is not valid JSON"),
        ("sparse_view_ct", "[8]", 400, "params must be a JSON object such as {\"views\": 8}, got a JSON list"),
        ("sparse_view_ct", '"fbp"', 400, "got a JSON str"),
    ],
)
def test_malformed_requests_get_4xx(server: Server, task: str, params: str, status: int, words: str, tmp_path: Path) -> None:
    """MONAI Label 0.8.5 answers these with a bare 500; the app answers with a 4xx and a message."""
    query = urllib.parse.urlencode({"image": "ct", "output": "image"})
    body = urllib.parse.urlencode({"params": params}).encode()
    got, content = server.post(f"/infer/{task}?{query}", body, "application/x-www-form-urlencoded")
    assert got == status, f"{task} {params!r}: HTTP {got}: {content[:500]!r}\n{server.tail()}"
    assert words in json.loads(content)["detail"]
    recon = _reconstruct(server, "sparse_view_ct", "ct", tmp_path / "after.nii.gz", method="fbp")
    assert recon.ndim == 3


def test_next_sample_offers_each_task_its_studies(server: Server) -> None:
    """Next Sample's ``random`` offers CT volumes only (for sparse_view_ct), ``random_sinogram`` sinograms only."""
    status, content = _get(f"{server.url}/info/")
    assert status == 200
    assert set(json.loads(content)["strategies"]) == {"random", "random_sinogram"}
    offered: dict[str, set[str]] = {"random": set(), "random_sinogram": set()}
    for strategy, tries in (("random", 20), ("random_sinogram", 5)):  # 20 random draws of 3 studies all miss sino: p = 3e-4
        for _ in range(tries):
            got, answer = server.post(f"/activelearning/{strategy}", b"{}", "application/json")
            assert got == 200, f"{strategy}: HTTP {got}: {answer[:500]!r}\n{server.tail()}"
            offered[strategy].add(json.loads(answer)["id"])
    assert offered["random"] and offered["random"] <= {"ct", "flat"}, offered
    assert offered["random_sinogram"] == {"sino"}, offered


def test_conf_values_out_of_range_stop_the_app(label_env: Path, studies: Path, tmp_path: Path) -> None:
    """``--conf`` values of request settings obey the requests' ranges: the app refuses to start otherwise."""
    code = (
        "import sys\n"
        "from bundle.monailabel.main import DiffusionBlendCTApp\n"
        "for conf in ({'views': '1e9'}, {'steps': '0'}, {'batch_size': '1000'}, {'memory_limit_gb': '-1'}):\n"
        "    try:\n"
        "        DiffusionBlendCTApp(sys.argv[1], sys.argv[2], conf)\n"
        "    except ValueError as err:\n"
        "        print('refused:', err)\n"
        "    else:\n"
        "        print('started:', conf)\n"
    )
    done = subprocess.run(
        [str(label_env), "-c", code, str(tmp_path), str(studies)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("refused:", "started:"))]
    assert lines == [
        "refused: --conf views: views must be <= 3600, got 1000000000.0",
        "refused: --conf steps: steps must be >= 1, got 0",
        "refused: --conf batch_size: batch_size must be <= 256, got 1000",
        "refused: memory_limit_gb must be a number of GB > 0 or null, got '-1'",
    ], done.stdout


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
