"""Time astra-matrix against ASTRA's own per-slice CPU projection on the same parallel-beam geometry.

For each case prints one JSON line: forward / adjoint seconds of both (median of ``--repeats``
runs), the speed ratio of forward+adjoint, the one-off matrix export time, and the
normalised adjoint error ``|<Ax,y> - <x,A^T y>| / (|A| |x| |y|)`` of both pairs (float64 sums).

    python scripts/benchmark_projectors.py [--shape 64 256 256] [--views 8 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import astra
import numpy as np
import torch

from bundle.physics.geometry import sparse_view
from bundle.physics.operators import AstraMatrixOperator
from bundle.physics.operators.astra_matrix import astra_geometries


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _astra_forward(pid: int, x: np.ndarray) -> np.ndarray:
    out = []
    for sl in x:
        sid, sino = astra.create_sino(sl, pid)
        astra.data2d.delete(sid)
        out.append(sino)
    return np.stack(out)


def _astra_adjoint(pid: int, y: np.ndarray) -> np.ndarray:
    out = []
    for sl in y:
        bid, bp = astra.create_backprojection(sl, pid)
        astra.data2d.delete(bid)
        out.append(bp)
    return np.stack(out)


def _adjoint_error(fwd: Callable, adj: Callable, x: np.ndarray, y: np.ndarray, norm: float) -> float:
    lhs = float(np.sum(fwd(x).astype(np.float64) * y))
    rhs = float(np.sum(x.astype(np.float64) * adj(y)))
    return abs(lhs - rhs) / (norm * float(np.linalg.norm(x.astype(np.float64))) * float(np.linalg.norm(y.astype(np.float64))))


def run_case(shape: tuple[int, int, int], n_views: int, repeats: int, projector: str) -> dict:
    """Benchmark one geometry; returns the JSON record."""
    g = sparse_view(n_views, shape, (1.0, 1.0, 1.0))
    t0 = time.perf_counter()
    op = AstraMatrixOperator(g, projector=projector)
    op.matrices()
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x = rng.random(g.vol_shape, dtype=np.float32)
    y = rng.random(g.sino_shape, dtype=np.float32)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        op(xt), op.T(yt)  # warm-up
        mat_fwd = _median_time(lambda: op(xt), repeats)
        mat_adj = _median_time(lambda: op.T(yt), repeats)
    vol_geom, proj_geom = astra_geometries(g)
    pid = astra.create_projector(projector, proj_geom, vol_geom)
    try:
        ast_fwd = _median_time(lambda: _astra_forward(pid, x), repeats)
        ast_adj = _median_time(lambda: _astra_adjoint(pid, y), repeats)
        norm = op.norm()
        with torch.no_grad():
            err_mat = _adjoint_error(lambda v: op(torch.from_numpy(v)).numpy(), lambda v: op.T(torch.from_numpy(v)).numpy(), x, y, norm)
        err_ast = _adjoint_error(lambda v: _astra_forward(pid, v), lambda v: _astra_adjoint(pid, v), x, y, norm)
        max_diff = float(np.abs(op(xt).numpy() - _astra_forward(pid, x)).max())
    finally:
        astra.projector.delete(pid)
    return {
        "case": f"parallel {shape[1]}x{shape[2]}x{shape[0]} {n_views} views ({projector})",
        "torch_threads": torch.get_num_threads(),
        "matrix_build_s": round(build_s, 3),
        "astra_matrix_forward_s": round(mat_fwd, 4),
        "astra_matrix_adjoint_s": round(mat_adj, 4),
        "astra_per_slice_forward_s": round(ast_fwd, 4),
        "astra_per_slice_adjoint_s": round(ast_adj, 4),
        "speed_ratio_forward_plus_adjoint": round((ast_fwd + ast_adj) / (mat_fwd + mat_adj), 2),
        "adjoint_error_astra_matrix": err_mat,
        "adjoint_error_astra_per_slice": err_ast,
        "max_abs_diff_forward": max_diff,
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "H", "W"))
    parser.add_argument("--views", type=int, nargs="+", default=(8, 60))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--projector", default="linear", choices=("linear", "strip", "line"))
    args = parser.parse_args()
    for n in args.views:
        print(json.dumps(run_case(tuple(args.shape), n, args.repeats, args.projector)), flush=True)


if __name__ == "__main__":
    main()
