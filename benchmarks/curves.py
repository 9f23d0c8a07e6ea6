"""Training curves of train.py runs from their TensorBoard logs: one picture, one JSON object.

  python benchmarks/curves.py EXP_DIR [EXP_DIR ...] [--metrics train/loss train/codes_used ...] [--out curves.png]

Each metric gets a panel with one line per run (the run's folder name). Without ``--metrics``, every scalar
that all runs logged under ``train/``. Prints, per run and metric, the first, the last and the step of the last
value: a table of what changed over training.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def scalars(exp_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard event files: name -> [(step, value)], in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(exp_dir.rglob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"{exp_dir}: no TensorBoard event files (train.py writes them under EXP_DIR/tb)")
    out: dict[str, dict[int, float]] = {}
    for f in files:  # a resumed run writes a second file: later values of a step win
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(v.items()) for tag, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="train.py exp_dir folders")
    ap.add_argument("--metrics", nargs="*", default=None, help="scalar names (default: all train/ ones in common)")
    ap.add_argument("--out", type=Path, default=Path("curves.png"))
    ap.add_argument("--dpi", type=int, default=90)
    ap.add_argument("--log", nargs="*", default=["train/loss", "train/contrastive_loss", "train/mlm_loss"],
                    help="metrics drawn on a log scale")
    args = ap.parse_args()
    runs = {p.name: scalars(p) for p in args.runs}
    names = args.metrics or sorted(set.intersection(*(set(k for k in r if k.startswith("train/")) for r in runs.values())))
    summary = {run: {m: {"first": v[0][1], "last": v[-1][1], "last_step": v[-1][0]}
                     for m in names if (v := data.get(m))} for run, data in runs.items()}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        for run, data in runs.items():
            if m in data:
                ax.plot(*zip(*data[m]), label=run, lw=1)
        ax.set(title=m, xlabel="step")
        if m in args.log:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi)
    print(json.dumps({"picture": str(args.out), "runs": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
