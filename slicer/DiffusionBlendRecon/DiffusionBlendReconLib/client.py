"""A client of the bundle's MONAI Label reconstruction server (docs/monailabel.md): standard library only.

3D Slicer's DiffusionBlendRecon module uses it, and so can any Python (3.9 or later): it
imports nothing of Slicer, Qt or MONAI Label. The REST contract it speaks (MONAI Label 0.8.5):

- ``GET /info/``: the server's tasks under ``models``; a reconstruction task has type
  ``others`` and a ``config`` of its settings with their defaults (a list is a choice, its
  first item the default).
- ``GET /datastore/?output=all``: the studies (their ids are the keys of ``objects``);
  ``GET /datastore/image?image=<id>`` sends one.
- ``POST /infer/<task>?image=<id>&output=all`` with the multipart form fields ``params``
  (the settings as a JSON object) and, to reconstruct a file instead of a study, ``file``:
  answers a multipart body with ``params`` (JSON: task, settings, metrics, seconds) and
  ``image`` (the reconstruction, NIfTI in HU on the study's grid). An error is an HTTP
  status with the server's message in ``detail``.

The server runs one request at a time in its event loop, so every call may wait for a running
reconstruction to finish. :func:`start` runs any call in a worker thread and returns a
:class:`Job` at once: poll :meth:`Job.done` (Slicer: from a ``qt.QTimer``) or pass a
``callback``, which runs in the worker thread (never touch a user interface from it).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "DEFAULT_SERVER",
    "RECONSTRUCTION_TYPE",
    "Client",
    "Job",
    "Reconstruction",
    "ServerError",
    "ServerUnreachable",
    "Task",
    "start",
]

DEFAULT_SERVER = "http://127.0.0.1:8000"

#: The MONAI Label task type of a reconstruction (it returns an image, not a label).
RECONSTRUCTION_TYPE = "others"

#: Seconds to wait for an answer: quick calls, and a reconstruction (minutes on a CPU).
INFO_TIMEOUT = 600.0
RECONSTRUCTION_TIMEOUT = 6 * 3600.0

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class ServerError(RuntimeError):
    """The server answered with an HTTP error; ``detail`` is its message.

    Args:
        status: the HTTP status (400 a bad setting, 404 an unknown task or study, 422 a study
            that cannot be reconstructed, 500 anything else).
        detail: the server's message.
        url: the request's URL.
    """

    def __init__(self, status: int, detail: str, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}: {detail}")
        self.status = status
        self.detail = detail
        self.url = url


class ServerUnreachable(ConnectionError):
    """No answer from the server: it is not running, not at this address, or did not answer in time."""


@dataclass(frozen=True)
class Task:
    """A reconstruction task of the server, as ``GET /info/`` lists it.

    Args:
        name: the task (``sparse_view_ct``, ``sinogram_ct``).
        description: the server's description.
        settings: the request settings with their defaults; a list is a choice (first item the default).
    """

    name: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def default(self, name: str) -> Any:
        """The default of a setting (the first choice of a list)."""
        value = self.settings[name]
        return value[0] if isinstance(value, list) and value else value

    def request_settings(self, entered: Mapping[str, Any]) -> dict[str, Any]:
        """The settings to send for values typed into a form (text): those that differ from the defaults.

        Each text is read as its default's type: a choice must be one of the choices, an
        integer an integer, a number a number; a setting without a default (``photons``) as
        JSON when it parses (``1e5``, ``null``), else as text. An empty text keeps the
        server's value. Ranges are the server's to check (it answers 400 with the rule).

        Raises:
            ValueError: an unknown setting, or a text that is not of the setting's type, naming both.
        """
        out: dict[str, Any] = {}
        for name, text in entered.items():
            if name not in self.settings:
                raise ValueError(f"{self.name} has no setting {name!r}; its settings are {sorted(self.settings)}")
            text = str(text).strip()
            if not text:
                continue
            default, value = self.settings[name], None
            if isinstance(default, list):
                if text not in [str(c) for c in default]:
                    raise ValueError(f"{name} must be one of {default}, got {text!r}")
                value = text
            elif isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"{name} must be true or false, got {text!r}")
                value = text.lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                try:
                    value = int(text)
                except ValueError:
                    raise ValueError(f"{name} must be an integer, got {text!r}") from None
            elif isinstance(default, float):
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{name} must be a number, got {text!r}") from None
            else:
                try:
                    value = json.loads(text)
                except ValueError:
                    value = text
            if value != self.default(name):
                out[name] = value
        return out


@dataclass(frozen=True)
class Reconstruction:
    """A reconstruction the server sent.

    Args:
        path: the NIfTI file written (HU, on the study's grid with its affine).
        task: the task that made it.
        image: the study id, or the name of the uploaded file.
        info: the server's JSON part: ``task``, ``settings``, ``metrics``, ``seconds``.
    """

    path: Path
    task: str
    image: str
    info: Mapping[str, Any]


class Job:
    """One call running in a worker thread (made by :func:`start`).

    ``done()`` says whether it has finished; then ``result`` holds its value or ``error`` the
    exception it raised. ``callback(job)``, when given, runs in the worker thread once it has finished.
    """

    def __init__(self, call: Callable[[], Any], callback: Optional[Callable[["Job"], None]] = None, name: str = "") -> None:
        self.name = name or getattr(call, "__name__", "call")
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.callback_error: Optional[BaseException] = None
        self.seconds: Optional[float] = None
        self._call = call
        self._callback = callback
        self._done = threading.Event()
        self._start = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"DiffusionBlendRecon {self.name}", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as err:  # reported through the job, never lost in the thread
            self.error = err
        self.seconds = time.monotonic() - self._start
        self._done.set()
        if self._callback is not None:
            try:
                self._callback(self)
            except BaseException as err:
                self.callback_error = err

    def done(self) -> bool:
        """Whether the call has finished (with a result or an error)."""
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the call has finished or ``timeout`` seconds have passed; whether it has finished."""
        return self._done.wait(timeout)

    @property
    def elapsed(self) -> float:
        """Seconds since the job started (its run time once done)."""
        return self.seconds if self.seconds is not None else time.monotonic() - self._start


def start(call: Callable[..., Any], *args: Any, callback: Optional[Callable[[Job], None]] = None, **kwargs: Any) -> Job:
    """Run ``call(*args, **kwargs)`` in a worker thread; returns its :class:`Job` at once."""
    job = Job(lambda: call(*args, **kwargs), callback, getattr(call, "__name__", ""))
    job.thread.start()
    return job


def _detail(body: bytes) -> str:
    """The server's message of an error body: ``detail`` of its JSON (FastAPI's list of errors joined), else the text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        return text or "(no message)"
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


def encode_multipart(fields: Mapping[str, str], files: Mapping[str, Path]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of text fields and files: ``(body, content type)``."""
    boundary = f"----DiffusionBlendRecon{uuid.uuid4().hex}"
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
        )
    for name, path in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{Path(path).name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + Path(path).read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[Optional[str], bytes]]:
    """The parts of a ``multipart/form-data`` body: ``{name: (filename or None, content)}``, binary-safe.

    Raises:
        ValueError: no boundary in ``content_type``.
    """
    params = dict(
        p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p
    )
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        raise ValueError(f"a multipart answer without a boundary (Content-Type {content_type!r})")
    out: dict[str, tuple[Optional[str], bytes]] = {}
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break  # the closing boundary
        head, _, content = chunk.partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        disposition = next(
            (line for line in head.decode("utf-8", "replace").split("\r\n") if line.lower().startswith("content-disposition")),
            "",
        )
        attrs = {}
        for item in disposition.split(";")[1:]:
            if "=" in item:
                key, value = item.strip().split("=", 1)
                attrs[key.lower()] = value.strip('"')
        if "name" in attrs:
            out[attrs["name"]] = (attrs.get("filename"), content)
    return out


def _stem(name: str) -> str:
    """A file name without its image suffix: ``ct.nii.gz`` -> ``ct``."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class Client:
    """Calls of the bundle's MONAI Label server (its REST API).

    Args:
        server_url: e.g. ``http://127.0.0.1:8000``.
        timeout: seconds to wait for a reconstruction.
        info_timeout: seconds to wait for the other calls (they wait for a running reconstruction too).
    """

    def __init__(
        self, server_url: str = DEFAULT_SERVER, timeout: float = RECONSTRUCTION_TIMEOUT, info_timeout: float = INFO_TIMEOUT
    ) -> None:
        url = server_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the server address must start with http:// or https://, got {server_url!r}")
        self.server_url = url
        self.timeout = float(timeout)
        self.info_timeout = float(info_timeout)

    # -- HTTP ------------------------------------------------------------------------------------

    def _request(
        self, path: str, data: Optional[bytes] = None, content_type: Optional[str] = None, timeout: Optional[float] = None
    ) -> tuple[bytes, Mapping[str, str]]:
        """``GET`` (or ``POST`` with ``data``) ``path``: the body and headers of a 2xx answer.

        Raises:
            ServerError: an HTTP error status, with the server's message.
            ServerUnreachable: no connection, or no answer within the timeout.
        """
        url = self.server_url + path
        headers = {"Content-Type": content_type} if content_type else {}
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
        wait = self.info_timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(request, timeout=wait) as answer:
                return answer.read(), dict(answer.headers.items())
        except urllib.error.HTTPError as err:
            raise ServerError(err.code, _detail(err.read()), url) from None
        except (socket.timeout, TimeoutError):
            raise ServerUnreachable(f"the MONAI Label server at {self.server_url} did not answer within {wait:g} s ({url})") from None
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServerUnreachable(
                f"cannot reach the MONAI Label server at {self.server_url} ({reason}): is it running? "
                "Start it with: .venv-label/bin/python -m bundle.monailabel --studies <folder>"
            ) from None

    def _json(self, path: str) -> Any:
        body, _ = self._request(path)
        return json.loads(body)

    # -- calls -----------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``GET /info/``: the server's name, version, tasks (``models``), strategies, ..."""
        return self._json("/info/")

    def tasks(self) -> dict[str, Task]:
        """The server's reconstruction tasks (type ``others``) by name."""
        models = self.info().get("models", {})
        return {
            name: Task(name, str(model.get("description", "")), dict(model.get("config") or {}))
            for name, model in sorted(models.items())
            if model.get("type") == RECONSTRUCTION_TYPE
        }

    def studies(self) -> list[str]:
        """The ids of the studies in the server's studies folder."""
        return sorted(self._json("/datastore/?output=all").get("objects", {}))

    def download_study(self, study: str, output_dir: Optional[os.PathLike] = None) -> Path:
        """``GET /datastore/image``: write a study's image into ``output_dir`` (default: a temporary folder); its path."""
        body, headers = self._request("/datastore/image?" + urllib.parse.urlencode({"image": study}))
        name = _filename(headers) or f"{study}.nii.gz"
        folder = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="dbct-"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / Path(name).name
        path.write_bytes(body)
        return path

    def reconstruct(
        self,
        task: str,
        study: Optional[str] = None,
        file: Optional[os.PathLike] = None,
        settings: Optional[Mapping[str, Any]] = None,
        output_dir: Optional[os.PathLike] = None,
    ) -> Reconstruction:
        """``POST /infer/<task>``: reconstruct a study of the server, or upload ``file`` and reconstruct it.

        Args:
            task: ``sparse_view_ct`` (a CT volume in HU) or ``sinogram_ct`` (a sinogram study
                with its geometry JSON on the server; an uploaded file has none).
            study: a study id (see :meth:`studies`).
            file: a CT volume on this machine (NIfTI or NRRD) to upload instead.
            settings: request settings (``{"method": "dbpp", "steps": 50}``); the rest keep the server's.
            output_dir: where to write the reconstruction (default: the temporary folder).

        Returns:
            The reconstruction: ``<image>_<task>_<method>.nii.gz`` in ``output_dir`` and the server's JSON.

        Raises:
            ValueError: neither or both of ``study`` and ``file``, or a file that does not exist.
            ServerError: the server refused or failed (its message in ``detail``).
            ServerUnreachable: no answer.
        """
        if (study is None) == (file is None):
            raise ValueError("give either a study id or a file to reconstruct, not both or neither")
        files: dict[str, Path] = {}
        if file is not None:
            files["file"] = Path(file)
            if not files["file"].is_file():
                raise ValueError(f"file {file} does not exist")
        image = study if study is not None else files["file"].name
        query = {"image": study or "", "output": "all"}
        body, content_type = encode_multipart({"params": json.dumps(dict(settings or {}))}, files)
        path = f"/infer/{urllib.parse.quote(task, safe='')}?" + urllib.parse.urlencode(query)
        answer, headers = self._request(path, body, content_type, timeout=self.timeout)
        kind = _header(headers, "content-type")
        if not kind.startswith("multipart/"):
            raise ServerError(200, f"the server sent no image ({kind or 'no content type'}): {answer[:300]!r}", self.server_url + path)
        parts = parse_multipart(answer, kind)
        if "image" not in parts:
            raise ServerError(200, f"the server's answer has no image part (parts: {sorted(parts)})", self.server_url + path)
        info = json.loads(parts["params"][1]) if "params" in parts else {}
        method = (info.get("settings") or {}).get("method") or (info.get("metrics") or {}).get("method") or "recon"
        folder = Path(output_dir) if output_dir is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        fd, out = tempfile.mkstemp(prefix=f"{_stem(image)}_{task}_{method}-", suffix=".nii.gz", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(parts["image"][1])
        return Reconstruction(Path(out), task, image, info)

    def reconstruct_async(self, *args: Any, callback: Optional[Callable[[Job], None]] = None, **kwargs: Any) -> Job:
        """:meth:`reconstruct` in a worker thread: returns its :class:`Job` at once (``job.result`` a :class:`Reconstruction`)."""
        return start(self.reconstruct, *args, callback=callback, **kwargs)


def _header(headers: Mapping[str, str], name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name), "")


def _filename(headers: Mapping[str, str]) -> Optional[str]:
    """The file name of a ``Content-Disposition`` header (``filename*=utf-8''...`` or ``filename="..."``)."""
    disposition = _header(headers, "content-disposition")
    for item in disposition.split(";"):
        key, _, value = item.strip().partition("=")
        if key.lower() == "filename*" and "''" in value:
            return urllib.parse.unquote(value.split("''", 1)[1])
        if key.lower() == "filename":
            return value.strip('"')
    return None
