"""The reconstruction workflow run by ``configs/inference.json``: file in, reconstruction, PNG and metrics out.

Two kinds of input:

- a CT volume (NIfTI, NRRD or a DICOM series folder) in HU: it is resampled to the model's
  grid by the config's ``preprocessing``, measurements are simulated from it with the
  requested geometry and noise, and the reconstruction is compared with it;
- a measured sinogram (``.npy`` or NIfTI, ``(Z, n_views, n_det)``) with its geometry JSON
  (``geometry_path``, or ``<name>.json`` beside it as ``save_sinogram`` writes it): an input
  is a sinogram by its geometry JSON, whatever its suffix; the reconstruction lies on the
  geometry's grid and there is no ground truth.

Outputs in ``output_dir``: ``<name>_recon.nii.gz`` (HU, on the input's grid with its affine),
``<name>_std.nii.gz`` when ``samples > 1``, ``<name>_views.png`` and ``metrics.json``. They are
written as one set: first into a hidden staging folder inside ``output_dir`` (created, and so
checked writable, before any work), then moved into place when all are complete, removing the
files of an earlier run that this run does not write (a stale ``_std``). A failure, SIGINT or
SIGTERM removes the staging folder and leaves the earlier outputs as they were.

Before anything is allocated, the settings' ranges are checked (each error names its setting),
the device must exist, and the run's memory is estimated (``bundle.limits``) and refused above
``memory_limit_gb``. Implausible inputs (a sinogram of counts or with negative line integrals,
angles in degrees, a volume not in HU) are errors unless ``allow_implausible`` is set.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.physics.geometry import Geometry, limited_angle, sparse_view
from bundle.io import file_sha256, save_json, save_nifti, save_orthogonal_views
from bundle.limits import check_memory, estimate_memory_bytes, memory_limit_bytes
from bundle.metrics import reconstruction_metrics
from bundle.networks import load_weights
from bundle.physics.simulation import MU_WATER, hu_to_normalized, normalized_to_hu, simulate_sinogram
from bundle.settings import as_bool, check_device, setting_number
from bundle.transforms.layout import from_zhw, to_zhw, voxel_size_zhw
from bundle.transforms.sinogram import find_sinogram_geometry, load_sinogram

__all__ = [
    "INPUT_KINDS",
    "Reconstruction",
    "check_device",
    "input_name",
    "make_geometry",
    "planned_views",
    "setting_number",
]

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
#: What a workflow accepts: either kind (recognised by the geometry JSON), or only one.
INPUT_KINDS = ("auto", "volume", "sinogram")
#: Files of one run, besides ``metrics.json``: ``<name><suffix>``.
OUTPUT_SUFFIXES = ("_recon.nii.gz", "_std.nii.gz", "_views.png")
_NULL = (None, "", "null", "None", "none")


def input_name(path: str | Path) -> str:
    """The input's name without its (double) suffix: ``a/ct.nii.gz -> ct``; a DICOM folder's own name."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def planned_views(views: int, arc_degrees: float = 180.0, step_degrees: float = 1.0) -> int:
    """The number of views :func:`make_geometry` gives, computed without building any angles."""
    if arc_degrees >= 180.0:
        return int(views)
    return max(1, int(round(arc_degrees / step_degrees)))


def check_inferer_settings(inferer: Any) -> None:
    """Check the ranges of the method's numeric settings (those it has), each error naming its setting."""
    rules: dict[str, dict[str, Any]] = {
        "steps": {"minimum": 1, "integer": True},
        "eta": {"minimum": 0.0, "maximum": 1.0},
        "batch_size": {"minimum": 1, "integer": True},
        "cg_iterations": {"minimum": 0, "integer": True},
        "warm_start": {"minimum": 0.0, "maximum": 1.0, "open_maximum": True},
        "seed": {"minimum": 0, "integer": True},
    }
    for name, rule in rules.items():
        value = getattr(inferer, name, None)
        if value is not None:
            setting_number(name, value, **rule)
    steps, timesteps = getattr(inferer, "steps", None), getattr(inferer, "alphas_cumprod", None)
    if steps is not None and timesteps is not None and int(steps) > len(timesteps):
        raise ValueError(f"steps must be <= num_train_timesteps ({len(timesteps)}), got {steps}")


def make_geometry(
    vol_shape: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    views: int = 8,
    arc_degrees: float = 180.0,
    step_degrees: float = 1.0,
    beam: str = "parallel",
) -> Geometry:
    """Sparse view (``views`` angles over 180 degrees) or limited angle (``arc_degrees`` at ``step_degrees``).

    ``arc_degrees >= 180`` gives the sparse-view geometry with ``views`` angles; a smaller arc
    gives the limited-angle geometry at ``step_degrees`` steps (``views`` is not used).
    """
    if arc_degrees >= 180.0:
        return sparse_view(int(views), vol_shape, voxel_size, beam=beam)
    return limited_angle(float(arc_degrees), float(step_degrees), vol_shape, voxel_size, beam=beam)


class Reconstruction:
    """Reconstruct one input with one method and write the reconstruction, a figure and metrics.

    Args:
        input_path: a CT volume (NIfTI/NRRD/DICOM folder) or a sinogram (``.npy``/NIfTI with its geometry JSON).
        output_dir: where the outputs go (created).
        preprocessing: MONAI transform of ``{"image": path}`` to the model grid, in normalised
            attenuation; its invertible transforms map the reconstruction back.
        inferer: the method (``bundle.recon.inferers.make_inferer``).
        network: the slab prior (``SlabDenoiser``) for blending methods.
        ckpt_path: its weights.
        network_2d: the k=1 prior for ``dds2d`` / ``mbir``.
        ckpt_path_2d: its weights.
        geometry_path: the geometry JSON of a sinogram input; a non-empty value makes a NIfTI input a sinogram.
        views: projections of the simulated sparse-view scan.
        arc_degrees: arc of the simulated scan (< 180: limited angle at ``step_degrees``).
        step_degrees: angular step of the limited-angle scan.
        beam: ``"parallel"`` or ``"fan"``.
        photons: incident photons per ray of the simulation (``None``: noiseless).
        electronic_noise: electronic noise of the simulation (counts).
        seed: seed of the simulation and of the first sample.
        samples: reconstructions with seeds ``seed, seed+1, ...``; with more than one, the mean
            is the reconstruction and the per-voxel standard deviation is written as well.
        device: where to reconstruct.
        hu_max: HU mapped to 1 by the preprocessing (``HUToNormalizedd``), for writing HU back.
        backend: projector backend for ``make_operator``.
        save_png: write the orthogonal-view figure.
        display_hu_max: HU shown as white in the figure (black is air, -1000 HU).
        input_kind: ``"auto"`` (a sinogram when it has a geometry JSON, else a volume), or
            ``"volume"`` / ``"sinogram"`` to refuse the other kind.
        allow_implausible: accept a sinogram with negative or implausibly large line integrals
            and angles outside [0, 2 pi] or in degrees (the volume's HU check is in the
            preprocessing, ``ValidateVolumed``).
        memory_limit_gb: the most memory (GB) the run may need by the estimate of
            ``bundle.limits``; None: ``DIFFUSIONBLEND_MEMORY_LIMIT_GB`` or half the machine's memory.
    """

    def __init__(
        self,
        input_path: str | Path,
        output_dir: str | Path,
        preprocessing: Callable[[dict], dict],
        inferer: Any,
        network: torch.nn.Module | None = None,
        ckpt_path: str | Path | None = None,
        network_2d: torch.nn.Module | None = None,
        ckpt_path_2d: str | Path | None = None,
        geometry_path: str | Path | None = None,
        views: int = 8,
        arc_degrees: float = 180.0,
        step_degrees: float = 1.0,
        beam: str = "parallel",
        photons: float | None = None,
        electronic_noise: float = 0.0,
        seed: int = 0,
        samples: int = 1,
        device: torch.device | str | None = None,
        hu_max: float = 2000.0,
        backend: str = "auto",
        save_png: bool = True,
        display_hu_max: float = 1000.0,
        input_kind: str = "auto",
        allow_implausible: bool | str = False,
        memory_limit_gb: float | str | None = None,
    ) -> None:
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
        check_inferer_settings(inferer)
        views = setting_number("views", views, 1, integer=True)
        arc_degrees = setting_number("arc_degrees", arc_degrees, 0.0, 360.0, open_minimum=True)
        step_degrees = setting_number("step_degrees", step_degrees, 0.0, open_minimum=True)
        photons = None if photons in _NULL else setting_number("photons", photons, 0.0, open_minimum=True)
        electronic_noise = setting_number("electronic_noise", electronic_noise, 0.0)
        seed = setting_number("seed", seed, 0, 2**63 - 1, integer=True)
        samples = setting_number("samples", samples, 1, integer=True)
        hu_max = setting_number("hu_max", hu_max, 0.0, open_minimum=True)
        self.input_kind = input_kind
        self.allow_implausible = as_bool(allow_implausible, "allow_implausible")
        self.memory_limit = memory_limit_bytes(memory_limit_gb)
        self.weights: dict[str, Any] | None = None
        self.input_path = Path(input_path)
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.network = network
        self.ckpt_path = ckpt_path
        self.network_2d = network_2d
        self.ckpt_path_2d = ckpt_path_2d
        self.geometry_path = None if geometry_path in _NULL else geometry_path
        self.views = int(views)
        self.arc_degrees = float(arc_degrees)
        self.step_degrees = float(step_degrees)
        self.beam = beam
        self.photons = photons
        self.electronic_noise = float(electronic_noise)
        self.seed = int(seed)
        self.samples = int(samples)
        self.device = check_device(device)
        self.mu_max = MU_WATER * (1.0 + float(hu_max) / 1000.0)
        self.backend = backend
        self.save_png = as_bool(save_png, "save_png")
        self.display_hu_max = float(display_hu_max)

    # -- pieces -------------------------------------------------------------------------------

    def sinogram_geometry(self) -> Path | None:
        """The geometry JSON of a sinogram input, None for a CT volume (``find_sinogram_geometry``).

        Raises:
            ValueError: the input is not of the kind ``input_kind`` demands, or a ``.npy`` without geometry.
        """
        geometry = find_sinogram_geometry(self.input_path, self.geometry_path)
        if self.input_kind == "volume" and geometry is not None:
            raise ValueError(
                f"input {self.input_path} is a sinogram (its geometry is {geometry}), but this workflow takes CT volumes"
            )
        if self.input_kind == "sinogram" and geometry is None:
            raise ValueError(
                f"input {self.input_path} is a CT volume (no geometry JSON beside it and no geometry_path), "
                "but this workflow takes sinograms"
            )
        return geometry

    def is_sinogram(self) -> bool:
        """Whether the input is a measured sinogram (it has a geometry JSON) rather than a CT volume."""
        return self.sinogram_geometry() is not None

    def _prior_and_weights(self) -> tuple[int | None, torch.nn.Module | None, Path | None, str]:
        """The method's slab size, its network and weights file, and the name of the weights setting."""
        k = getattr(self.inferer, "slab_size", None)
        if k is None:
            return None, None, None, ""
        network, ckpt, setting = (
            (self.network_2d, self.ckpt_path_2d, "ckpt_path_2d") if k == 1 else (self.network, self.ckpt_path, "ckpt_path")
        )
        method = getattr(self.inferer, "method", type(self.inferer).__name__)
        if network is None:
            raise ValueError(f"the method needs a prior with slab_size={k}, but none is configured")
        if ckpt in _NULL:
            raise ValueError(
                f"{setting} is empty, but method {method} needs the trained weights of its slab_size={k} prior; "
                f"set {setting} to a weights file (models/ holds the shipped ones)"
            )
        if not Path(ckpt).is_file():
            raise ValueError(f"{setting} {ckpt} does not exist (method {method} needs the weights of its slab_size={k} prior)")
        return k, network, Path(ckpt), setting

    def check_weights(self) -> None:
        """Refuse a diffusion method whose weights are not configured or missing, before any work."""
        self._prior_and_weights()

    def prior(self) -> torch.nn.Module | None:
        """The network the method needs, with its weights loaded (None for classical methods).

        Sets :attr:`weights` to the file's path and SHA-256, recorded in ``metrics.json``.

        Raises:
            ValueError: the weights setting is empty or names a missing or unloadable file.
        """
        k, network, ckpt, setting = self._prior_and_weights()
        if network is None or ckpt is None:
            return None
        if getattr(network, "slab_size", k) != k:
            raise ValueError(f"the method needs a prior with slab_size={k}, the configured one has {network.slab_size}")
        load_weights(network, ckpt)
        self.weights = {"setting": setting, "path": str(ckpt), "sha256": file_sha256(ckpt)}
        return network.to(self.device)

    def check_memory(self, vol_shape: tuple[int, int, int], n_views: int, n_det: int, beam: str) -> int:
        """Refuse the run when its estimated memory (``bundle.limits``) exceeds ``memory_limit_gb``; the estimate."""
        method = getattr(self.inferer, "method", None) or "tv"
        estimate = estimate_memory_bytes(
            vol_shape,
            n_views,
            n_det,
            method,
            batch_size=int(getattr(self.inferer, "batch_size", 1) or 1),
            slab_size=int(getattr(self.inferer, "slab_size", None) or 1),
            samples=self.samples,
            projector_matrix=beam != "cone",
        )
        z, h, w = vol_shape
        check_memory(estimate, f"{method} on a {z} x {h} x {w} grid with {n_views} views", self.memory_limit)
        return estimate

    def operator(self, geometry: Geometry) -> Any:
        """The projector of ``geometry`` on this workflow's device and backend."""
        from bundle.physics.operators import make_operator

        return make_operator(geometry, backend=self.backend, device=self.device)

    def _reconstruct(self, sino: torch.Tensor, operator: Any) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Mean (and std over samples) of the reconstructions ``(Z, H, W)`` and their total cost."""
        network = self.prior()
        sino = sino.to(self.device)
        recons, runs = [], []
        for i in range(self.samples):
            recons.append(self.inferer(sino, network, operator, seed=self.seed + i).float().cpu())
            runs.append(dict(getattr(self.inferer, "stats", {})))
        stats = dict(runs[0])
        for key in ("seconds", "network_seconds", "nfe", "network_calls", "slab_evaluations"):
            if key in stats:
                stats[key] = sum(run[key] for run in runs)
        for key in ("peak_memory_mb", "peak_memory_increase_mb"):
            if key in stats:
                stats[key] = max(run[key] for run in runs)
        stack = torch.stack(recons)
        std = stack.std(0, unbiased=False) if self.samples > 1 else None
        return stack.mean(0), std, stats

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Reconstruct, write the outputs as one set, and return the metrics written to ``metrics.json``."""
        start = time.perf_counter()
        if not self.input_path.exists():  # a file, or a folder holding a DICOM series
            raise FileNotFoundError(f"input {self.input_path} does not exist")
        geometry_path = self.sinogram_geometry()
        self.check_weights()
        name = input_name(self.input_path)
        with staging_folder(self.output_dir) as stage:
            truth = None
            if geometry_path is not None:
                sino, geometry = load_sinogram(
                    self.input_path, geometry_path, allow_implausible=self.allow_implausible, limit_bytes=self.memory_limit
                )
                self.check_memory(tuple(geometry.vol_shape), geometry.n_views, _detector_bins(geometry), geometry.kind)
                recon, std, stats = self._reconstruct(sino, self.operator(geometry))
                dz, dy, dx = geometry.voxel_size
                affine = np.diag([dx, dy, dz, 1.0])
                affine[:3, 3] = -0.5 * (np.array(recon.shape[::-1]) - 1) * np.array([dx, dy, dz])
                out = from_zhw(recon)[0]
                out_std = from_zhw(std)[0] if std is not None else None
            else:
                image = self._preprocess()
                x = to_zhw(image).float()
                if not torch.isfinite(x).all():
                    raise ValueError(f"input {self.input_path} contains NaN or Inf values")
                voxel_size = voxel_size_zhw(image)
                n_views = planned_views(self.views, self.arc_degrees, self.step_degrees)
                n_det = _detector_bins(make_geometry(tuple(x.shape), voxel_size, 1, 180.0, 1.0, self.beam))
                self.check_memory(tuple(x.shape), n_views, n_det, self.beam)
                geometry = make_geometry(
                    tuple(x.shape), voxel_size, self.views, self.arc_degrees, self.step_degrees, self.beam
                )
                operator = self.operator(geometry)
                generator = torch.Generator(device=self.device).manual_seed(self.seed)
                sino = simulate_sinogram(
                    x.to(self.device), operator, self.photons, self.electronic_noise, generator, mu_max=self.mu_max
                )
                recon, std, stats = self._reconstruct(sino, operator)
                out, affine = self._invert(image, recon)
                out_std = self._invert(image, std)[0] if std is not None else None
                truth = self._original(image)
            hu = normalized_to_hu(out, mu_water=MU_WATER, mu_max=self.mu_max)
            save_nifti(hu, affine, stage / f"{name}_recon.nii.gz")
            if out_std is not None:
                hu_per_unit = 1000.0 * self.mu_max / MU_WATER  # d HU / d (normalised attenuation)
                save_nifti(out_std * hu_per_unit, affine, stage / f"{name}_std.nii.gz")
            metrics: dict[str, Any] = {
                "input": str(self.input_path),
                "method": getattr(self.inferer, "method", None) or type(self.inferer).__name__,
                "inferer": repr(self.inferer),
                "weights": self.weights,
                "geometry": geometry.to_dict(),
                "photons": self.photons,
                "seed": self.seed,
                "samples": self.samples,
                **stats,
            }
            window = float(hu_to_normalized(torch.tensor(self.display_hu_max), MU_WATER, self.mu_max))
            # the figure shows the model grid (RAS after the preprocessing), so the views are the radiological ones
            shown = [("reconstruction", recon)]
            if truth is not None:
                metrics.update(reconstruction_metrics(to_zhw(out[None]), to_zhw(truth[None]), MU_WATER, self.mu_max))
                shown.append(("ground truth", x))
            if std is not None:  # scaled so that the largest std is white
                shown.append(("std (scaled)", std * (window / max(float(std.max()), 1e-8))))
            if self.save_png:
                save_orthogonal_views(
                    shown, stage / f"{name}_views.png", vmax=window, title=f"{name}: {metrics['method']}"
                )
            metrics["total_seconds"] = time.perf_counter() - start
            save_json(metrics, stage / "metrics.json")
            publish(stage, self.output_dir, [f"{name}{suffix}" for suffix in OUTPUT_SUFFIXES] + ["metrics.json"])
        logger.info("wrote %s", self.output_dir / f"{name}_recon.nii.gz")
        return metrics

    def _preprocess(self) -> Any:
        """The input through the preprocessing (load, check, resample); an unreadable file is an error naming it."""
        if self.input_path.is_dir() and not any(p.is_file() for p in self.input_path.rglob("*")):
            raise ValueError(f"input {self.input_path} is an empty folder: expected a DICOM series or a volume file")
        try:
            return self.preprocessing({"image": str(self.input_path)})["image"]
        except Exception as err:
            cause = _root_cause(err)
            if isinstance(cause, ValueError) and str(self.input_path.name) in str(cause):
                raise cause from err  # already names the file (ValidateVolumed)
            raise ValueError(
                f"input {self.input_path} cannot be read as a CT volume: {type(cause).__name__}: {cause}"
            ) from err

    def _invert(self, image: Any, volume: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Map ``volume`` ``(Z, H, W)`` on the model grid back to the input's grid: ``((X, Y, Z), affine)``."""
        from monai.data import MetaTensor

        pred = MetaTensor(from_zhw(volume), meta=dict(image.meta), applied_operations=list(image.applied_operations))
        inverse = getattr(self.preprocessing, "inverse", None)
        if inverse is not None:
            pred = inverse({"image": pred})["image"]
        affine = np.asarray(pred.affine if hasattr(pred, "affine") else np.eye(4), dtype=np.float64)
        return torch.as_tensor(pred)[0].float(), affine

    def _original(self, image: Any) -> torch.Tensor:
        """The input volume in normalised attenuation on its own grid ``(X, Y, Z)``, as the ground truth."""
        from monai.transforms import LoadImage

        hu = LoadImage(image_only=True, ensure_channel_first=True)(str(self.input_path))
        return hu_to_normalized(torch.as_tensor(hu)[0].float(), MU_WATER, self.mu_max)


def _root_cause(err: BaseException) -> BaseException:
    """The innermost cause of an exception chain (MONAI wraps a transform's error in RuntimeErrors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _detector_bins(geometry: Geometry) -> int:
    """Detector bins per view of a slice-stack geometry; ``rows * cols / Z`` for cone beam (same sinogram size)."""
    det_shape = getattr(geometry, "det_shape", None)
    if det_shape is not None:
        return max(1, int(det_shape[0]) * int(det_shape[1]) // max(int(geometry.vol_shape[0]), 1))
    return int(geometry.det_count)


@contextmanager
def staging_folder(output_dir: Path) -> Iterator[Path]:
    """A hidden folder inside ``output_dir`` for one run's outputs, removed on exit whatever happens.

    Creating it checks that ``output_dir`` is writable before the work starts. While it exists,
    SIGTERM raises ``SystemExit`` (in the main thread) so that the folder is removed as on
    SIGINT, which raises ``KeyboardInterrupt``.

    Raises:
        PermissionError: ``output_dir`` cannot be created or written, naming it.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=output_dir))
    except OSError as err:
        raise PermissionError(f"output_dir {output_dir} is not writable: {err.strerror or err}") from err
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def publish(stage: Path, output_dir: Path, names: list[str]) -> None:
    """Move the staged files of ``names`` into ``output_dir`` and remove those this run did not write.

    The earlier ``metrics.json`` goes first and the new one last, so a ``metrics.json`` always
    describes the files beside it.
    """
    written = [n for n in names if (stage / n).is_file()]
    (output_dir / "metrics.json").unlink(missing_ok=True)
    for n in names:
        if n not in written:
            (output_dir / n).unlink(missing_ok=True)  # a stale output of an earlier run (e.g. its _std)
    for n in sorted(written, key=lambda n: n == "metrics.json"):
        os.replace(stage / n, output_dir / n)
