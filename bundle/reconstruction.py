"""The reconstruction workflow run by ``configs/inference.json``: file in, reconstruction, PNG and metrics out.

Two kinds of input:

- a CT volume (NIfTI, NRRD or a DICOM series folder) in HU: it is resampled to the model's
  grid by the config's ``preprocessing``, measurements are simulated from it with the
  requested geometry and noise, and the reconstruction is compared with it;
- a measured sinogram (``.npy`` or NIfTI, ``(Z, n_views, n_det)``) with its geometry JSON
  (``geometry_path``, or ``<name>.json`` beside it): the
  reconstruction lies on the geometry's grid and there is no ground truth.

Outputs in ``output_dir``: ``<name>_recon.nii.gz`` (HU, on the input's grid with its affine),
``<name>_std.nii.gz`` when ``samples > 1``, ``<name>_views.png`` and ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.geometry import Geometry, limited_angle, sparse_view
from bundle.io import save_json, save_nifti, save_orthogonal_views
from bundle.metrics import reconstruction_metrics
from bundle.networks import load_weights
from bundle.physics import MU_WATER, hu_to_normalized, normalized_to_hu, simulate_sinogram
from bundle.settings import as_bool
from bundle.transforms.layout import from_zhw, to_zhw, voxel_size_zhw
from bundle.transforms.sinogram import load_sinogram

__all__ = ["Reconstruction", "make_geometry", "input_name"]

logger = logging.getLogger(__name__)

SINOGRAM_SUFFIXES = (".npy",)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def input_name(path: str | Path) -> str:
    """The input's name without its (double) suffix: ``a/ct.nii.gz -> ct``; a DICOM folder's own name."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


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
    ) -> None:
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.input_path = Path(input_path)
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.network = network
        self.ckpt_path = ckpt_path
        self.network_2d = network_2d
        self.ckpt_path_2d = ckpt_path_2d
        self.geometry_path = geometry_path or None
        self.views = int(views)
        self.arc_degrees = float(arc_degrees)
        self.step_degrees = float(step_degrees)
        self.beam = beam
        self.photons = None if photons in (None, "", "null", "None") else float(photons)
        self.electronic_noise = float(electronic_noise)
        self.seed = int(seed)
        self.samples = int(samples)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mu_max = MU_WATER * (1.0 + float(hu_max) / 1000.0)
        self.backend = backend
        self.save_png = as_bool(save_png, "save_png")
        self.display_hu_max = float(display_hu_max)

    # -- pieces -------------------------------------------------------------------------------

    def is_sinogram(self) -> bool:
        """Whether the input is a measured sinogram rather than a CT volume."""
        name = self.input_path.name.lower()
        return name.endswith(SINOGRAM_SUFFIXES) or bool(self.geometry_path)

    def prior(self) -> torch.nn.Module | None:
        """The network the method needs, with its weights loaded (None for classical methods)."""
        k = getattr(self.inferer, "slab_size", None)
        if k is None:
            return None
        network, ckpt = (self.network_2d, self.ckpt_path_2d) if k == 1 else (self.network, self.ckpt_path)
        if network is None:
            raise ValueError(f"the method needs a prior with slab_size={k}, but none is configured")
        if getattr(network, "slab_size", k) != k:
            raise ValueError(f"the method needs a prior with slab_size={k}, the configured one has {network.slab_size}")
        if ckpt:
            load_weights(network, ckpt)
        return network.to(self.device)

    def operator(self, geometry: Geometry) -> Any:
        """The projector of ``geometry`` on this workflow's device and backend."""
        from bundle.operators import make_operator

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
        """Reconstruct, write the outputs, and return the metrics written to ``metrics.json``."""
        start = time.perf_counter()
        if not self.input_path.exists():  # a file, or a folder holding a DICOM series
            raise FileNotFoundError(f"input {self.input_path} does not exist")
        name = input_name(self.input_path)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        truth = None
        if self.is_sinogram():
            sino, geometry = load_sinogram(self.input_path, self.geometry_path)
            recon, std, stats = self._reconstruct(sino, self.operator(geometry))
            dz, dy, dx = geometry.voxel_size
            affine = np.diag([dx, dy, dz, 1.0])
            affine[:3, 3] = -0.5 * (np.array(recon.shape[::-1]) - 1) * np.array([dx, dy, dz])
            out = from_zhw(recon)[0]
            out_std = from_zhw(std)[0] if std is not None else None
        else:
            data = self.preprocessing({"image": str(self.input_path)})
            image = data["image"]
            x = to_zhw(image).float()
            if not torch.isfinite(x).all():
                raise ValueError(f"input {self.input_path} contains NaN or Inf values")
            geometry = make_geometry(
                tuple(x.shape), voxel_size_zhw(image), self.views, self.arc_degrees, self.step_degrees, self.beam
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
        save_nifti(hu, affine, self.output_dir / f"{name}_recon.nii.gz")
        if out_std is not None:
            hu_per_unit = 1000.0 * self.mu_max / MU_WATER  # d HU / d (normalised attenuation)
            save_nifti(out_std * hu_per_unit, affine, self.output_dir / f"{name}_std.nii.gz")
        metrics: dict[str, Any] = {
            "input": str(self.input_path),
            "method": getattr(self.inferer, "method", None) or type(self.inferer).__name__,
            "inferer": repr(self.inferer),
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
            metrics.update(reconstruction_metrics(to_zhw(out[None]), to_zhw(truth[None])))
            shown.append(("ground truth", x))
        if std is not None:  # scaled so that the largest std is white
            shown.append(("std (scaled)", std * (window / max(float(std.max()), 1e-8))))
        if self.save_png:
            save_orthogonal_views(
                shown, self.output_dir / f"{name}_views.png", vmax=window, title=f"{name}: {metrics['method']}"
            )
        metrics["total_seconds"] = time.perf_counter() - start
        save_json(metrics, self.output_dir / "metrics.json")
        logger.info("wrote %s", self.output_dir / f"{name}_recon.nii.gz")
        return metrics

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
