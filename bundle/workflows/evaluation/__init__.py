"""Evaluation: volumes x settings x methods into one table (CSV and JSON) and figures.

Driven by ``configs/evaluate.json`` (merged over ``configs/inference.json``, whose
preprocessing and networks it reuses), by ``scripts/benchmark.py``, and under ``torchrun`` by
``configs/multi_gpu_evaluate.json``. In four parts:

- :mod:`.plan`: every cell (volume x setting x method) as a frozen :class:`~.plan.Cell`, built by
  the pure :func:`~.plan.plan_cells`. Each cell is one
  :class:`bundle.workflows.inference.Reconstruction` run writing its outputs under
  ``output_dir/<volume>/<setting>/<method>[_<variant>]/``.
- :mod:`.cache`: with ``resume=True`` a cell whose outputs are already in its folder is read back
  instead of run again, if its ``cell.json`` matches the cell exactly (method, settings, samples,
  acquisition, seed, digests of the preprocessed ground truth and of the prior's weights).
- :mod:`.table`: the rows, ``results.csv`` / ``results.json``, the ``selected`` variant.
- figures (:mod:`bundle.workflows.figures`): ``results.png`` (bars with units and fitted axes) and
  per volume and setting the views (ground truth, reconstructions and the std of posterior means
  in the ``window``, and again in the bone window), the difference maps and a z-profile.

A method is a name of :func:`bundle.recon.inferers.make_inferer` or a *variant*: a mapping
``{"method": "tv", "variant": "lam=0.0005", "settings": {"lam": 5e-4}}`` (e.g. a sweep of a
weight). A variant's ``samples`` setting (diffusion methods) makes the cell the mean of that many
reconstructions with consecutive seeds, the posterior-mean estimate; it is reported as its own
method row (``samples`` column), never pooled with the single-sample one. Of the variants of one
method and number of samples, the best by PSNR per volume and setting is marked ``selected``;
the figures show the selected ones. A method whose prior's weights file is missing is not run:
its row says so in ``note``.

With ``distributed=True`` (under ``torchrun``) rank ``r`` of ``W`` runs the cells ``i % W == r`` on
its own device; rank 0 gathers the rows and writes the table and figures, which equal those of
one process at the same seed.
"""

from bundle.workflows.evaluation.plan import SETTING_KEYS, Cell, MethodSpec, plan_cells, setting_name
from bundle.workflows.evaluation.table import NFE_COLUMNS, TABLE_COLUMNS, cell_row, method_label, select_best, write_table
from bundle.workflows.evaluation.workflow import Evaluation

__all__ = [
    "NFE_COLUMNS", "SETTING_KEYS", "TABLE_COLUMNS", "Cell", "Evaluation", "MethodSpec", "cell_row", "method_label",
    "plan_cells", "select_best", "setting_name", "write_table",
]
