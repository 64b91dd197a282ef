"""Plot the training loss (and validation PSNR when logged) of a training run from its TensorBoard events.

Usage:
    python scripts/plot_training.py runs/train --out docs/figures/training_loss.png
    python scripts/plot_training.py runs/train runs/train_ft     # a run continued with --init_from: legs end to end
    python scripts/plot_training.py runs/aug_2d --until 1200     # a run stopped after the checkpoint it ships
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """All values of ``tag`` across the event files of ``run_dir`` (resumed runs append files), by step."""
    steps, values = {}, {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                steps[e.step], values[e.step] = e.step, e.value
    order = sorted(steps)
    return np.array(order), np.array([values[s] for s in order])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, nargs="+", help="run folders; each later one continues the one before (--init_from)")
    p.add_argument("--out", type=Path, default=Path("docs/figures/training_loss.png"))
    p.add_argument("--smooth", type=int, default=50, help="moving-average window (iterations)")
    p.add_argument("--title", default="Slab prior training loss")
    p.add_argument("--until", type=int, default=None, help="last iteration shown (counted over all legs), e.g. the checkpoint shipped")
    p.add_argument("--window", type=int, default=200, help="iterations averaged for the first / last loss printed")
    args = p.parse_args()
    legs = []
    offset = 0
    for run_dir in args.run_dir:
        steps, loss = read_scalars(run_dir, "train_loss")
        if len(steps) == 0:
            raise SystemExit(f"no 'train_loss' scalars in {run_dir}")
        legs.append((run_dir, steps + offset, loss))
        offset += int(steps.max())
    steps = np.concatenate([leg[1] for leg in legs])
    loss = np.concatenate([leg[2] for leg in legs])
    if args.until is not None:
        keep = steps <= args.until
        if not keep.any():
            raise SystemExit(f"no iteration at or before --until {args.until}")
        steps, loss = steps[keep], loss[keep]
        legs = [leg for leg in legs if leg[1][0] <= args.until]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, color="0.8", lw=0.5, label="per iteration")
    if len(loss) >= args.smooth:
        kernel = np.ones(args.smooth) / args.smooth
        ax.plot(steps[args.smooth - 1:], np.convolve(loss, kernel, mode="valid"), color="C0", label=f"mean of {args.smooth}")
    for run_dir, leg_steps, _ in legs[1:]:
        ax.axvline(leg_steps[0], color="C1", lw=0.8, ls="--")
        ax.annotate(f" {run_dir.name}", (leg_steps[0], 1), xycoords=("data", "axes fraction"), va="top", fontsize=7, color="C1")
    ax.set(xlabel="iteration", ylabel="MSE (epsilon)", yscale="log", title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    n = min(len(loss), args.window)
    print(f"{args.out}: {len(steps)} iterations (to {int(steps.max())}); mean loss {loss[:n].mean():.4f} over the first {n}, "
          f"{loss[-n:].mean():.4f} over the last {n}")


if __name__ == "__main__":
    main()
