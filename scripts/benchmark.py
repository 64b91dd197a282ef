"""Side-by-side benchmark of every reconstruction method on held-out CT volumes (issue 5), in one command.

    python scripts/benchmark.py                                   # the full benchmark -> eval/benchmark/
    python scripts/benchmark.py --max_slices 24 --steps 20 --views 8 --arcs none --photons none
    python scripts/benchmark.py --nfe 10 20 50 100 200            # and the NFE sweep of dbpp vs dds2d
    python scripts/benchmark.py --datalist data/lidc/datalist.json --volumes LIDC-0001

It drives ``configs/evaluate.json`` (merged over ``configs/inference.json``) through
``monai.bundle run`` with:

- volumes: the ``test`` list of ``configs/datalist_shared_ct.json`` (the ../shared/data/ct
  volumes the shipped priors were not trained on), plus the ``test`` list of every
  ``--datalist``; ``--volumes`` restricts them by name or gives files directly;
- methods: ``fbp``, ``sirt``, ``tv`` (a sweep of its weight ``--tv_weights``; the best by
  3D PSNR per volume and setting is ``selected``, every weight is in the table), ``dds2d``,
  ``mbir``, ``fixed``, ``db``, ``dbpp``; a method whose weights file is missing (e.g.
  ``models/model_2d.pt`` for ``dds2d`` / ``mbir``) is not run, and its row says so;
- ``--samples 1 4``: each diffusion method as one sample and as the mean of 4 (rows of their own);
- settings: the product of the geometries (``--views`` over 180 degrees, ``--arcs`` at
  ``--step_degrees``; ``none`` leaves either out) and the noise levels (``--photons``: ``none`` is noiseless);
- ``--resume``: runs already in ``--out`` with exactly the same specification (method,
  settings, seed, preprocessed volume, weights; each run's ``cell.json``) are read back, not
  run again: a stopped benchmark continues, and a method can be added to a finished one.

Outputs in ``--out``: ``results.csv`` / ``results.json`` (PSNR and SSIM in 3D and per
orientation, seconds, NFE, peak memory per run), ``results.png`` (bar charts),
``figures/<volume>_<setting>_{views,views_bone,diff,zprofile}.png`` (``--window``, default
soft tissue W400/L40, and the bone window), each run's reconstruction under
``<volume>/<setting>/<method>/``, ``benchmark.json`` (the command and its settings), and with
``--nfe`` the sweep ``nfe.csv`` / ``nfe.json`` / ``nfe.png`` (PSNR against time, dbpp vs dds2d).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.io import atomic_path, save_json  # noqa: E402
from bundle.recon.inferers import method_slab_size  # noqa: E402
from bundle.workflows.evaluation import NFE_COLUMNS, write_table  # noqa: E402
from bundle.workflows.figures import WINDOWS, plot_nfe, window_range  # noqa: E402
from bundle.workflows.sources import input_name  # noqa: E402

logger = logging.getLogger("benchmark")

ALL_METHODS = ("fbp", "sirt", "tv", "dds2d", "mbir", "fixed", "db", "dbpp")
SHARED_DATALIST = ROOT / "configs" / "datalist_shared_ct.json"
SHARED_DATA = ROOT.parent / "shared" / "data" / "ct"
CONFIGS = [str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "evaluate.json")]


def _none_or(kind: type, what: str):
    """An argparse type: ``none`` (no setting of this kind) or a positive ``kind``."""

    def parse(text: str) -> Any:
        if text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} or 'none'") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be > 0")
        return value

    return parse


def _window(text: str) -> str:
    """An argparse type: a window preset or ``W/L`` in HU (``bundle.workflows.figures.window_range``)."""
    try:
        window_range(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


_counts = _none_or(int, "a number of views")
_degrees = _none_or(float, "an arc in degrees")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "benchmark", help="output folder")
    parser.add_argument("--datalist", type=Path, nargs="*", default=[], help="more datalists; their 'test' lists are added")
    parser.add_argument("--datalist_key", "--datalist-key", default="test", help="which list of the --datalist files to read")
    parser.add_argument("--data_root", "--data-root", type=Path, default=None, help="base folder of --datalist entries (default: each file's folder)")
    parser.add_argument("--no_shared", "--no-shared", action="store_true", help="leave out the shared held-out volumes")
    parser.add_argument(
        "--volumes", nargs="*", default=None,
        help="restrict to these volumes: names (as in the table) of the listed ones, or files used directly",
    )
    parser.add_argument("--methods", nargs="*", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--tv_weights", "--tv-weights", type=float, nargs="*", default=[1e-4, 5e-4, 2e-3], help="TV weights swept (lam)")
    parser.add_argument(
        "--views", type=_counts, nargs="+", default=[8, 6, 4],
        help="sparse-view settings over 180 degrees; 'none': no sparse-view setting",
    )
    parser.add_argument(
        "--arcs", type=_degrees, nargs="+", default=[90.0],
        help="limited-angle arcs in degrees (e.g. --arcs 90 120); 'none': no limited-angle setting",
    )
    parser.add_argument("--step_degrees", "--step-degrees", type=float, default=1.0, help="angular step of the limited-angle arcs")
    parser.add_argument("--photons", nargs="*", default=["none", "1e5"], help="noise levels: incident photons per ray, 'none' = noiseless")
    parser.add_argument(
        "--samples", type=int, nargs="+", default=[1],
        help="run each diffusion method as the mean of N samples (seeds seed..seed+N-1, the posterior-mean "
        "estimate), once per N given; 1 is a single sample (default)",
    )
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (NFE) of the diffusion methods (default: the config's)")
    parser.add_argument("--max_slices", "--max-slices", type=int, default=None, help="keep the central N slices of each volume (quick runs)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", type=Path, default=None, help="weights of the slab prior (default models/model.pt)")
    parser.add_argument("--ckpt_2d", "--ckpt-2d", type=Path, default=None, help="weights of the 2D prior (default models/model_2d.pt)")
    parser.add_argument("--nfe", type=int, nargs="*", default=[], help="NFE sweep of dbpp vs dds2d at these step counts")
    parser.add_argument("--nfe_setting", "--nfe-setting", default=None, help="setting of the NFE sweep (default: '8 views' if run, else the first)")
    parser.add_argument(
        "--window", type=_window, default="soft_tissue",
        help=f"grey window of the views figures: {', '.join(WINDOWS)} or W/L in HU, e.g. 400/40 (a bone-window figure is written too)",
    )
    parser.add_argument("--no_figures", "--no-figures", action="store_true")
    parser.add_argument(
        "--resume", action="store_true",
        help="reuse the runs already in --out that match exactly (cell.json: settings, data and weights digests)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
        help="any bundle config override, e.g. --set batch_size=32 --set 'network_def#channels=[8,16]'",
    )
    args = parser.parse_args(argv)
    args.views = [v for v in args.views if v is not None]  # 'none' asks for no setting of that kind
    args.arcs = [a for a in args.arcs if a is not None]
    return args


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def crop_slices(path: str | Path, max_slices: int, output_dir: str | Path) -> Path:
    """The central ``max_slices`` axial slices of a NIfTI volume, written to ``output_dir`` under the same name (affine kept consistent).

    Returns ``path`` itself when the volume has no more slices than that.
    """
    import nibabel as nib

    image = nib.load(str(path))
    depth = image.shape[2]
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    if depth <= max_slices:
        return Path(path)
    start = (depth - max_slices) // 2
    out = Path(output_dir) / f"{input_name(path)}.nii.gz"
    with atomic_path(out) as tmp:
        nib.save(image.slicer[:, :, start:start + max_slices], str(tmp))
    return out


def find_volumes(args: argparse.Namespace) -> list[Path]:
    """The benchmark's volumes: shared held-out ones and --datalist ones, restricted or replaced by --volumes."""
    from bundle.workflows.data import load_datalist

    listed: list[Path] = []
    if not args.no_shared:
        if SHARED_DATA.is_dir():
            listed += [Path(e["image"]) for e in load_datalist(SHARED_DATALIST, "test", SHARED_DATA)]
        else:
            logger.warning("no shared data at %s: the held-out volumes of %s are left out", SHARED_DATA, SHARED_DATALIST.name)
    for datalist in args.datalist:
        listed += [Path(e["image"]) for e in load_datalist(datalist, args.datalist_key, args.data_root)]
    if args.volumes is None:
        volumes = listed
    else:
        volumes = []
        for item in args.volumes:
            if Path(item).exists():
                volumes.append(Path(item))
                continue
            matches = [v for v in listed if input_name(v) == item]
            if not matches:
                raise SystemExit(f"--volumes {item!r} is neither a file nor one of {[input_name(v) for v in listed]}")
            volumes += matches
    volumes = list(dict.fromkeys(volumes))
    if not volumes:
        raise SystemExit("no volumes to benchmark (pass --volumes FILE or --datalist)")
    return volumes


def make_settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Geometries x noise levels, each with a readable name ("8 views", "90 degrees, 1e5 photons")."""
    geometries = [(f"{v} views", {"views": v}) for v in args.views]
    geometries += [(f"{a:g} degrees", {"arc_degrees": a, "step_degrees": args.step_degrees}) for a in args.arcs]
    settings = []
    for (name, geometry), photons in itertools.product(geometries, args.photons):
        if str(photons).lower() in ("none", "0", "noiseless"):
            settings.append({"name": name, **geometry})
        else:
            settings.append({"name": f"{name}, {float(photons):.0e} photons".replace("e+0", "e"), **geometry, "photons": float(photons)})
    if not settings:
        raise SystemExit("--views / --arcs: no settings left (both are 'none')")
    return settings


def make_methods(args: argparse.Namespace) -> list[Any]:
    """Method names in the order given, ``tv`` expanded into its weight sweep, diffusion methods by ``--samples``."""
    methods: list[Any] = []
    for method in args.methods:
        if method_slab_size(method) is not None:
            for n in dict.fromkeys(args.samples):
                if n < 1:
                    raise SystemExit(f"--samples must be >= 1, got {n}")
                methods.append(method if n == 1 else {"method": method, "variant": f"mean of {n}", "settings": {"samples": n}})
            continue
        if method == "tv" and len(args.tv_weights) > 1:
            methods += [{"method": "tv", "variant": f"lam={w:g}", "settings": {"lam": w}} for w in args.tv_weights]
        elif method == "tv" and args.tv_weights:
            methods.append({"method": "tv", "variant": f"lam={args.tv_weights[0]:g}", "settings": {"lam": args.tv_weights[0]}})
        else:
            methods.append(method)
    return methods


def run_evaluation(
    volumes: Sequence[Path], methods: Sequence[Any], settings: Sequence[dict], out: Path, args: argparse.Namespace, **extra: Any
) -> list[dict[str, Any]]:
    """One ``monai.bundle run`` of configs/evaluate.json; the rows of its results.json."""
    from monai.bundle import run

    overrides: dict[str, Any] = {
        "bundle_root": str(ROOT),
        "eval_volumes": [str(v) for v in volumes],
        "eval_methods": list(methods),
        "eval_settings": list(settings),
        "eval_dir": str(out),
        "seed": args.seed,
        "progress": False,
        "evaluation#figures": not args.no_figures,
        "eval_window": args.window,
        "eval_resume": bool(args.resume),
    }
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.device is not None:
        overrides["device"] = args.device
    if args.ckpt is not None:
        overrides["ckpt_path"] = str(args.ckpt)
    if args.ckpt_2d is not None:
        overrides["ckpt_path_2d"] = str(args.ckpt_2d)
    overrides.update(_overrides(args.overrides))
    overrides.update(extra)
    run(config_file=CONFIGS, **overrides)
    return json.loads((out / "results.json").read_text())["rows"]


def nfe_sweep(volumes: Sequence[Path], settings: Sequence[dict], args: argparse.Namespace) -> list[dict[str, Any]]:
    """dbpp and dds2d at every ``--nfe`` step count on one setting: rows with ``steps``, nfe.csv/json and nfe.png."""
    names = [s["name"] for s in settings]
    wanted = args.nfe_setting or ("8 views" if "8 views" in names else names[0])
    if wanted not in names:
        raise SystemExit(f"--nfe-setting {wanted!r} is not one of the settings {names}")
    setting = settings[names.index(wanted)]
    rows = []
    for k, steps in enumerate(args.nfe, start=1):
        logger.info("NFE sweep, evaluation %d of %d: dbpp and dds2d at %d steps", k, len(args.nfe), steps)
        sub = argparse.Namespace(**{**vars(args), "steps": steps, "no_figures": True})
        for row in run_evaluation(volumes, ["dbpp", "dds2d"], [setting], args.out / "nfe" / f"steps_{steps}", sub):
            rows.append({**row, "steps": steps})
    write_table(rows, args.out, name="nfe", columns=NFE_COLUMNS)
    plot_nfe(rows, args.out / "nfe.png")
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return ``{"rows": ..., "nfe_rows": ..., "out": ...}``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    volumes = find_volumes(args)
    if args.max_slices:
        volumes = [crop_slices(v, args.max_slices, args.out / "inputs") for v in volumes]
    settings = make_settings(args)
    methods = make_methods(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    save_json(
        {
            "command": " ".join(["python", "scripts/benchmark.py", *(argv if argv is not None else sys.argv[1:])]),
            "started": started.isoformat(timespec="seconds"),
            "host": platform.platform(),
            "volumes": [str(v) for v in volumes],
            "methods": methods,
            "settings": settings,
            "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        },
        args.out / "benchmark.json",
    )
    rows = run_evaluation(volumes, methods, settings, args.out, args) if methods else []
    nfe_rows = nfe_sweep(volumes, settings, args) if args.nfe else []
    skipped = sorted({f"{r['method']}: {r['note']}" for r in rows + nfe_rows if str(r.get("note", "")).startswith("skipped")})
    for line in skipped:
        logger.warning(line)
    logger.info("wrote %s (%d runs)", args.out / "results.csv", len(rows))
    return {"rows": rows, "nfe_rows": nfe_rows, "out": args.out}


if __name__ == "__main__":
    main()
