"""The evaluation workflow: plan -> (resume cache | reconstruct) each cell -> table -> figures."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bundle.limits import check_memory, estimate_memory_bytes, memory_limit_bytes
from bundle.recon.inferers import make_inferer
from bundle.settings import as_bool
from bundle.workflows.evaluation.cache import CellCache, PreparedVolumes
from bundle.workflows.evaluation.plan import Cell, plan_cells
from bundle.workflows.evaluation.progress import CellProgress
from bundle.workflows.evaluation.table import cell_row, figure_columns, method_label, select_best, write_table
from bundle.workflows.distributed import DistributedRun
from bundle.workflows.figures import comparison_figures, plot_table, window_range
from bundle.workflows.inference import Reconstruction
from bundle.workflows.priors import Prior, Priors
from bundle.workflows.ranks import Ranks

__all__ = ["Evaluation", "OwnCell", "missing_weights"]

logger = logging.getLogger("bundle.workflows.evaluation")


def missing_weights(prior: Prior | None) -> str | None:
    """Why the cells of a method with ``prior`` are not run (its weights file is configured empty or missing), or None."""
    if prior is None:
        return None
    if prior.ckpt_path is None:
        return f"skipped: no weights for its slab_size={prior.slab_size} prior ({prior.setting} is empty)"
    if not prior.ckpt_path.is_file():
        return f"skipped: no weights for its slab_size={prior.slab_size} prior ({prior.ckpt_path} not found)"
    return None


class OwnCell(DistributedRun):
    """A cell's reconstruction is this process's alone, under ``torchrun`` too: all of its input, written here.

    The evaluation shares whole cells among the processes; each cell's
    :class:`~bundle.workflows.inference.Reconstruction` must neither share its input nor wait for
    the other processes, which are reconstructing other cells.
    """

    @property
    def writes(self) -> bool:
        return True

    def share(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(items)

    def merge(self, results: list[dict[str, Any]], stage: Path) -> list[dict[str, Any]]:
        return results


class Evaluation:
    """Reconstruct every volume with every method under every setting; write one table and figures.

    Args:
        volumes: CT volumes (NIfTI/NRRD/DICOM folders) used as ground truth.
        methods: method names of :func:`bundle.recon.inferers.make_inferer`, or variants
            ``{"method": ..., "variant": ..., "settings": {...}}`` (:class:`~bundle.workflows.evaluation.plan.MethodSpec`).
        settings: acquisition settings, each a mapping with a ``name`` and any of the fields of
            :class:`~bundle.physics.acquisition.Acquisition` (``views``, ``arc_degrees``, ``step_degrees``,
            ``beam``, ``photons``, ``electronic_noise``).
        output_dir: where the per-cell outputs, ``results.csv``, ``results.json``, ``results.png`` and ``figures/`` go.
        preprocessing: the inference preprocessing (to the model grid).
        inferer_settings: settings passed to every ``make_inferer`` call (steps, eta, ...).
        network, ckpt_path, network_2d, ckpt_path_2d: the priors (:class:`~bundle.workflows.priors.Priors`).
        seed: seed of the simulation and the sampler.
        device: where to reconstruct.
        hu_max: as in the preprocessing.
        make_inferer_fn: the inferer factory.
        figures: write the comparison figures per volume and setting into ``output_dir/figures``.
        window: the grey window of the figures: a preset (``soft_tissue``, ``lung``, ``bone``, ``wide``),
            ``"W/L"`` in HU or a ``(width, level)`` pair (:func:`bundle.workflows.figures.window_range`).
        resume: read back the cells that already ran with exactly their specification
            (:mod:`~bundle.workflows.evaluation.cache`) instead of running them again.
        allow_implausible: passed to each :class:`~bundle.workflows.inference.Reconstruction`.
        memory_limit_gb: the memory limit of every cell (``bundle.limits``); every cell's estimate
            is checked against it before the first one runs.
        distributed: share the cells among the ranks of the initialised ``torch.distributed``
            process group (``configs/multi_gpu_evaluate.json``); rank 0 writes the table and figures.
    """

    def __init__(
        self,
        volumes: Sequence[str | Path],
        methods: Sequence[str | Mapping[str, Any]],
        settings: Sequence[Mapping[str, Any]],
        output_dir: str | Path,
        preprocessing: Callable[[dict], dict],
        inferer_settings: Mapping[str, Any] | None = None,
        network: torch.nn.Module | None = None,
        ckpt_path: str | Path | None = None,
        network_2d: torch.nn.Module | None = None,
        ckpt_path_2d: str | Path | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        hu_max: float = 2000.0,
        make_inferer_fn: Callable[..., Any] = make_inferer,
        figures: bool = True,
        window: str | Sequence[float] = "soft_tissue",
        resume: bool = False,
        allow_implausible: bool | str = False,
        memory_limit_gb: float | str | None = None,
        distributed: bool | str = False,
    ) -> None:
        self.cells = plan_cells(volumes, settings, methods, inferer_settings, int(seed))
        for method in dict.fromkeys(cell.method for cell in self.cells):
            make_inferer_fn(method)  # fail early on an unknown method
        missing = [str(v) for v in dict.fromkeys(cell.volume for cell in self.cells) if not v.exists()]
        if missing:
            raise FileNotFoundError(f"evaluation volumes do not exist: {missing}")
        window_range(window)  # a bad window fails before any work, naming it
        self.output_dir, self.window, self.make_inferer_fn = Path(output_dir), window, make_inferer_fn
        self.preprocessing, self.device, self.hu_max = preprocessing, device, float(hu_max)
        self.priors = Priors(network, ckpt_path, network_2d, ckpt_path_2d)
        self.volumes = PreparedVolumes(preprocessing)
        self.cache = CellCache(self.volumes, self.priors, self.hu_max)
        self.figures, self.resume = as_bool(figures, "figures"), as_bool(resume, "resume")
        self.allow_implausible = as_bool(allow_implausible, "allow_implausible")
        self.distributed = as_bool(distributed, "distributed")
        self.memory_limit_gb, self.memory_limit = memory_limit_gb, memory_limit_bytes(memory_limit_gb)

    def run(self) -> list[dict[str, Any]]:
        """Run this process's cells; rank 0 writes ``results.csv``, ``results.json``, ``results.png`` and the figures; the rows."""
        self.check_sizes()
        ranks = self.ranks()
        done = self.run_cells([cell for cell in self.cells if ranks.owns(cell.index)], ranks)
        rows = [row for _, row in sorted((pair for share in ranks.gather(done) for pair in share), key=lambda p: p[0])]
        if ranks.is_main:
            self.write(select_best(rows))
        return rows

    def run_cells(self, cells: Sequence[Cell], ranks: Ranks) -> list[tuple[int, dict[str, Any]]]:
        """``(index, row)`` of each of ``cells``, logging "cell k of N"; one process keeps a partial table as it goes."""
        progress = CellProgress(len(cells), prefix=f"rank {ranks.rank} of {ranks.world}: " if ranks.world > 1 else "")
        done = []
        for cell in cells:
            done.append((cell.index, self.evaluate(cell, progress)))
            if ranks.world == 1:  # a partial table, should a later cell fail
                write_table(select_best([row for _, row in done]), self.output_dir)
        return done

    def ranks(self) -> Ranks:
        """This process among those sharing the cells (``distributed``), or the one process."""
        if not self.distributed:
            return Ranks()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                "distributed=true needs an initialised torch.distributed process group: run under torchrun with "
                "configs/multi_gpu_evaluate.json"
            )
        return Ranks.current()

    def skip_reason(self, cell: Cell) -> str | None:
        """Why ``cell`` is not run (:func:`missing_weights` of the prior its method needs), or None."""
        return missing_weights(self.priors.for_method(cell.method, cell.slab_size))

    def check_sizes(self) -> None:
        """Refuse the evaluation before any cell runs when one of its cells exceeds the memory limit (``bundle.limits``)."""
        for cell in self.cells:
            if self.skip_reason(cell) is not None:
                continue
            shape, voxel_size = self.volumes.grid(cell.volume)
            scan = cell.scan
            estimate = estimate_memory_bytes(
                shape, scan.n_views, scan.detector_bins(shape, voxel_size), cell.method,
                batch_size=int(cell.inferer_settings.get("batch_size", 8)), slab_size=cell.slab_size, samples=cell.samples,
                projector_matrix=scan.beam != "cone",
            )  # fmt: skip
            grid = " x ".join(str(n) for n in shape)
            check_memory(estimate, f"evaluation cell {cell.label} ({grid} grid, {scan.n_views} views)", self.memory_limit)

    def evaluate(self, cell: Cell, progress: CellProgress) -> dict[str, Any]:
        """One cell's table row: skipped, read back from the cache, or reconstructed."""
        progress.start(cell.label)
        try:
            reason = self.skip_reason(cell)
            if reason is not None:
                logger.warning("%s: %s", cell.label, reason)
                return cell_row(cell, None, None, note=reason)
            spec = self.cache.spec(cell)
            metrics = self.cache.finished(cell, self.output_dir, spec) if self.resume else None
            if metrics is not None:
                logger.info("reusing %s from %s", cell.label, cell.folder(self.output_dir))
            else:
                self.cache.forget(cell, self.output_dir)
                metrics = self.reconstruct(cell)
                self.cache.remember(cell, self.output_dir, spec)
            return cell_row(cell, metrics, cell.recon_path(self.output_dir))
        finally:
            progress.finish()

    def reconstruct(self, cell: Cell) -> dict[str, Any]:
        """Reconstruct ``cell`` into its folder; its metrics."""
        return Reconstruction(
            input_path=cell.volume,
            output_dir=cell.folder(self.output_dir),
            preprocessing=self.preprocessing,
            inferer=self.make_inferer_fn(cell.method, **cell.inferer_settings),
            network=self.priors.network,
            ckpt_path=self.priors.ckpt_path,
            network_2d=self.priors.network_2d,
            ckpt_path_2d=self.priors.ckpt_path_2d,
            seed=cell.seed,
            samples=cell.samples,
            device=self.device,
            hu_max=self.hu_max,
            allow_implausible=self.allow_implausible,
            memory_limit_gb=self.memory_limit_gb,
            figure_window=self.window,
            distributed=OwnCell(),
            **cell.acquisition,
        ).run()

    def write(self, rows: list[dict[str, Any]]) -> None:
        """The table, its chart and (``figures``) the comparison figures of every volume and setting."""
        write_table(rows, self.output_dir)
        plot_table([r for r in rows if r["selected"]], self.output_dir / "results.png", method_label=method_label)
        if self.figures:
            groups: dict[tuple[Path, str], Cell] = {}
            for cell in self.cells:
                groups.setdefault((cell.volume, cell.setting), cell)
            for cell in groups.values():
                self.comparison(cell, rows)

    def comparison(self, cell: Cell, rows: Sequence[Mapping[str, Any]]) -> None:
        """The figures of ``cell``'s volume and setting: the selected variant of each method that ran."""
        shown = figure_columns(rows, cell.name, cell.setting)
        if shown and cell.volume.is_file():
            prefix = self.output_dir / "figures" / f"{cell.name}_{cell.setting_folder}"
            comparison_figures(cell.volume, shown, prefix, window=self.window, title=f"{cell.name}, {cell.setting}")
