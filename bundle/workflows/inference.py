"""The reconstruction workflow run by ``configs/inference.json``: inputs in, reconstructions, figures and metrics out.

The inputs are one file (``input_path``: a CT volume or a sinogram with its geometry JSON), every
volume and sinogram of a folder (``input_dir``) or the ``image`` entries of a datalist
(``datalist``, its ``datalist_key`` list); :mod:`bundle.workflows.sources` says what each kind
gives. They are read by a MONAI ``Dataset`` / ``DataLoader``, reconstructed with the configured
method (``N = samples`` draws, :func:`bundle.recon.posterior.draw_samples`, measured by
:mod:`bundle.workflows.profiling`), mapped back to the input's grid and affine by the config's
``postprocessing`` (``Invertd``) and written by MONAI's ``SaveImage``.

Outputs in ``output_dir``, per input: ``<name>_recon.nii.gz`` (HU, on the input's grid with its
affine), ``<name>_std.nii.gz`` when ``samples > 1``, ``<name>_views.png``; and ``metrics.json``
(one input: its metrics; several: ``{"results": [...]}``). They are written as one set
(:mod:`bundle.workflows.outputs`).

Before anything is allocated, the settings' ranges are checked (each error names its setting),
the device must exist, every input must exist and be of the kind ``input_kind`` takes, the
method's weights must be configured, and each input's memory is estimated (``bundle.limits``)
and refused above ``memory_limit_gb``. Implausible inputs (a sinogram of counts or with negative
line integrals, angles in degrees, a volume not in HU) are errors unless ``allow_implausible`` is set.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset

import bundle
from bundle.io import save_json
from bundle.limits import check_memory, estimate_memory_bytes, memory_limit_bytes
from bundle.metrics import reconstruction_metrics
from bundle.physics.acquisition import Acquisition, make_geometry, planned_views
from bundle.physics.operators import make_operator
from bundle.physics.simulation import MU_WATER, hu_to_normalized, normalized_to_hu
from bundle.precision import inference_weights
from bundle.recon.method import ReconstructionMethod
from bundle.recon.posterior import Posterior, draw_samples
from bundle.settings import as_bool, check_device, setting_number
from bundle.transforms.layout import to_zhw
from bundle.workflows.distributed import DistributedRun
from bundle.workflows.outputs import OUTPUT_SUFFIXES, publish, save_volume, staging_folder
from bundle.workflows.priors import Priors
from bundle.workflows.profiling import CountedNetwork, Profile
from bundle.workflows.figures import views_figure, window_range
from bundle.workflows.sources import INPUT_KINDS, LoadInput, Source, input_name, list_inputs, make_source

__all__ = [
    "INPUT_KINDS",
    "Reconstruction",
    "check_device",
    "default_postprocessing",
    "input_name",
    "make_geometry",
    "planned_views",
    "setting_number",
]

logger = logging.getLogger(__name__)


def default_postprocessing(preprocessing: Any) -> Callable[[dict], dict]:
    """``Invertd`` of ``pred`` and ``std`` through ``preprocessing`` (what ``configs/inference.json`` configures)."""
    from monai.transforms import Invertd

    return Invertd(keys=["pred", "std"], transform=preprocessing, orig_keys="image", nearest_interp=False, allow_missing_keys=True)


def _one(item: Any) -> Any:
    """The DataLoader's collate of one unbatched item: the item itself (a sinogram's geometry is no tensor)."""
    return item


class Reconstruction:
    """Reconstruct every input with one method and write the reconstructions, figures and metrics.

    Args:
        input_path: a CT volume (NIfTI/NRRD/DICOM folder) or a sinogram with its geometry JSON.
        output_dir: where the outputs go (created).
        preprocessing: the MONAI transform of ``{"image": path}`` to the model grid in normalised attenuation.
        inferer: the method (``bundle.recon.inferers.make_inferer``).
        network, ckpt_path, network_2d, ckpt_path_2d: the priors (:class:`bundle.workflows.priors.Priors`).
        geometry_path: the geometry JSON of a sinogram ``input_path``.
        views, arc_degrees, step_degrees, beam, photons, electronic_noise: the simulated scan
            (:class:`bundle.physics.acquisition.Acquisition`).
        seed: seed of the simulation and of the first sample.
        samples: reconstructions with seeds ``seed, seed+1, ...``; their mean is the reconstruction,
            their per-voxel standard deviation is written as well.
        device: where to reconstruct.
        hu_max: HU mapped to 1 by the preprocessing (``HUToNormalizedd``), for writing HU back.
        backend: projector backend for ``make_operator``.
        save_png: write the orthogonal-view figures.
        figure_window: their grey window, a preset (``soft_tissue``, ``lung``, ``bone``, ``wide``) or
            ``"width/level"`` in HU (:func:`bundle.workflows.figures.window_range`).
        input_kind: ``"auto"``, or ``"volume"`` / ``"sinogram"`` to refuse the other kind.
        allow_implausible: accept implausible sinograms (the volume's HU check is ``ValidateVolumed``'s).
        memory_limit_gb: the most memory (GB) a reconstruction may need by ``bundle.limits``'s estimate.
        input_dir, datalist, datalist_key: every volume and sinogram of a folder, or the entries of a
            datalist's list, instead of ``input_path`` (:func:`bundle.workflows.sources.list_inputs`).
        postprocessing: maps ``{"image", "pred", "std"}`` back to the input's grid; default :func:`default_postprocessing`.
        distributed: how the processes of a ``torchrun`` share the work (``configs/multi_gpu_inference.json``,
            :class:`bundle.workflows.distributed.DistributedRun`); default: one process does all of it.
    """

    # One argument per setting of configs/inference.json, so the signature is long; the body is short.
    def __init__(
        self,
        input_path: str | Path | None,
        output_dir: str | Path,
        preprocessing: Callable[[dict], dict],
        inferer: ReconstructionMethod,
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
        figure_window: str = "soft_tissue",
        input_kind: str = "auto",
        allow_implausible: bool | str = False,
        memory_limit_gb: float | str | None = None,
        input_dir: str | Path | None = None,
        datalist: str | Path | None = None,
        datalist_key: str = "testing",
        postprocessing: Callable[[dict], dict] | None = None,
        distributed: DistributedRun | None = None,
    ) -> None:
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
        if not isinstance(inferer, ReconstructionMethod):
            raise TypeError(f"inferer must be a reconstruction method (bundle.recon.inferers.make_inferer), got {inferer!r}")
        self.inputs = dict(input_path=input_path, input_dir=input_dir, datalist=datalist, datalist_key=datalist_key,
                           geometry_path=geometry_path, input_kind=input_kind)  # fmt: skip
        self.acquisition = Acquisition(views, arc_degrees, step_degrees, beam, photons, electronic_noise)
        self.seed = setting_number("seed", seed, 0, 2**63 - 1, integer=True)
        self.samples = setting_number("samples", samples, 1, integer=True)
        self.mu_max = MU_WATER * (1.0 + float(setting_number("hu_max", hu_max, 0.0, open_minimum=True)) / 1000.0)
        self.allow_implausible = as_bool(allow_implausible, "allow_implausible")
        self.memory_limit = memory_limit_bytes(memory_limit_gb)
        self.priors = Priors(network, ckpt_path, network_2d, ckpt_path_2d)
        self.output_dir, self.preprocessing, self.postprocessing = Path(output_dir), preprocessing, postprocessing
        self.distributed = distributed if distributed is not None else DistributedRun()
        self.inferer, self.device, self.backend = inferer, check_device(device), backend
        self.save_png = as_bool(save_png, "save_png")
        try:
            window_range(figure_window)  # a bad window fails before any work, naming the setting
        except ValueError as err:
            raise ValueError(f"figure_window: {err}") from None
        self.figure_window = figure_window

    def run(self) -> dict[str, Any]:
        """Reconstruct every input, write the outputs as one set, and return what ``metrics.json`` holds."""
        start = time.perf_counter()
        items = list_inputs(**self.inputs)  # type: ignore[arg-type]
        prior = self.priors.for_slab_size(self.inferer.slab_size)
        if prior is not None:
            prior.check(self.inferer.method)
        share = self.distributed.share(items)  # under torchrun: this process's inputs
        dataset = Dataset(share, transform=LoadInput(self.preprocessing, self.allow_implausible, self.memory_limit))
        with staging_folder(self.output_dir) as stage:
            network, weights = prior.load(self.device, self.inferer.method) if prior is not None else (None, None)
            results = []
            for item in DataLoader(dataset, batch_size=None, collate_fn=_one, num_workers=0):
                source = make_source(item, self.acquisition, self.mu_max)
                metrics = self.reconstruct(source, network, weights, stage)
                results.append({**metrics, "total_seconds": time.perf_counter() - start})
            results = self.distributed.merge(results, stage)  # under torchrun: every process's, in input order
            summary = results[0] if len(results) == 1 else {"results": results}
            if not self.distributed.writes:  # process 0 writes the outputs
                return summary
            save_json(summary, stage / "metrics.json")
            names = [f"{item['name']}{suffix}" for item in items for suffix in OUTPUT_SUFFIXES]
            publish(stage, self.output_dir, names + ["metrics.json"])
        logger.info("wrote %d reconstruction(s) to %s", len(results), self.output_dir)
        return summary

    def reconstruct(self, source: Source, network: torch.nn.Module | None, weights: dict | None, stage: Path) -> dict[str, Any]:
        """Reconstruct one input with the prior ``network`` (its file's record ``weights``), write its images into ``stage``; its metrics."""
        self.check_memory(*source.plan)
        geometry = source.geometry()
        operator = make_operator(geometry, backend=self.backend, device=self.device)
        y = source.measurements(operator, torch.Generator(device=self.device).manual_seed(self.seed))
        # the counted network is what the sampler sees, so it holds the bf16 weights when bf16 is on
        bf16 = self.inferer.precision(self.device) == "bf16"
        counted = CountedNetwork(inference_weights(network, bf16)) if network is not None else None
        with Profile(self.device, counted) as profile:
            posterior = draw_samples(self.inferer, y, counted, operator, range(self.seed, self.seed + self.samples))
        outputs = source.outputs({"pred": posterior.mean, "std": posterior.std}, self._postprocessing())
        metrics = self.record(source, geometry, weights)
        metrics.update(profile.stats(), nfe=posterior.nfe, working_shape=self.inferer.working_shape(operator, network))
        if source.ground_truth is not None:
            pred = to_zhw(outputs["pred"]).float()
            metrics.update(reconstruction_metrics(pred, to_zhw(source.ground_truth), MU_WATER, self.mu_max))
        self.write(stage, source, outputs, posterior, geometry.voxel_size)
        return metrics

    def record(self, source: Source, geometry: Any, weights: dict | None) -> dict[str, Any]:
        """What ``metrics.json`` says of a run before its figures: input, bundle version, method and its settings,
        weights, acquisition, geometry, device and precision."""
        return {
            "input": str(source.path), "bundle_version": bundle.__version__, "method": self.inferer.method,
            "inferer": repr(self.inferer), "method_settings": method_settings(self.inferer), "weights": weights,
            "acquisition": dataclasses.asdict(self.acquisition) if source.ground_truth is not None else None,
            "geometry": geometry.to_dict(), "photons": self.acquisition.photons, "seed": self.seed,
            "samples": self.samples, "device": str(self.device), "precision": self.inferer.precision(self.device),
        }  # fmt: skip

    def write(self, stage: Path, source: Source, outputs: Mapping[str, Any], posterior: Posterior,
              voxel_size: tuple[float, float, float]) -> None:
        """The NIfTI images in HU (``SaveImage``) and the figure of one input."""
        pred = outputs["pred"]
        save_volume(normalized_to_hu(pred, MU_WATER, self.mu_max), pred.affine, stage / f"{source.name}_recon.nii.gz", "HU")
        hu_per_unit = 1000.0 * self.mu_max / MU_WATER  # d HU / d (normalised attenuation)
        if "std" in outputs:
            std = outputs["std"]
            save_volume(std * hu_per_unit, std.affine, stage / f"{source.name}_std.nii.gz", "HU (standard deviation)")
        if not self.save_png:
            return
        # the figure shows the model grid (RAS after the preprocessing) at its voxel size, in HU
        def hu(volume: torch.Tensor) -> Any:
            return normalized_to_hu(volume, MU_WATER, self.mu_max).cpu().numpy()

        truth = hu(source.volume) if source.ground_truth is not None and source.volume is not None else None
        std = (posterior.std * hu_per_unit).cpu().numpy() if posterior.std is not None else None
        views_figure([(self.inferer.method or "reconstruction", hu(posterior.mean))], voxel_size,
                     stage / f"{source.name}_views.png", window=self.figure_window, truth=truth, std=std,
                     title=f"{source.name}: {self.inferer.method}")

    def check_memory(self, vol_shape: tuple[int, int, int], n_views: int, n_det: int, beam: str) -> int:
        """Refuse a reconstruction whose estimated memory (``bundle.limits``) exceeds ``memory_limit_gb``; the estimate."""
        method = self.inferer.method or "tv"
        estimate = estimate_memory_bytes(
            vol_shape, n_views, n_det, method, batch_size=self.inferer.batch_size, slab_size=self.inferer.slab_size or 1,
            samples=self.samples, projector_matrix=beam != "cone",
        )  # fmt: skip
        z, h, w = vol_shape
        check_memory(estimate, f"{method} on a {z} x {h} x {w} grid with {n_views} views", self.memory_limit)
        return estimate

    def _postprocessing(self) -> Callable[[dict], dict]:
        return self.postprocessing if self.postprocessing is not None else default_postprocessing(self.preprocessing)


def method_settings(method: ReconstructionMethod) -> dict[str, Any]:
    """A method's settings as plain values for ``metrics.json`` (steps, eta, CG, schedule, ... or a classical method's)."""
    plain = (bool, int, float, str, type(None))
    settings = {k: v for k, v in vars(method).items() if isinstance(v, plain) and not k.startswith("_")}
    settings.update({k: v for k, v in getattr(method, "kwargs", {}).items() if isinstance(v, plain)})
    for part in ("schedule", "data_consistency", "noise_schedule", "warm_start_method"):
        value = getattr(method, part, None)
        if isinstance(value, functools.partial):  # a factory wired with _mode_: callable
            value = f"{value.func.__name__}({', '.join(f'{k}={v!r}' for k, v in value.keywords.items())})"
        if value is not None:
            settings[part] = value if isinstance(value, str) else repr(value)
    return settings
