"""Per-bucket report of a CutSet under given bins and batch sizes: a table and a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from cuts.bins import Bins

COLUMNS = ("bucket", "upper_s", "cuts", "hours", "batch_size", "audio_s_per_batch", "padding", "steps_per_epoch")


def bucket_report(durations: np.ndarray, uppers: list[float], batch_sizes: Optional[list[int]],
                  batch_duration: Optional[float], seed: int = 0) -> list[dict]:
    """One row per bucket. Padding is simulated: the bucket's cuts in random order, in batches."""
    rng = np.random.default_rng(seed)
    idx = np.searchsorted(np.asarray(uppers), durations, side="left")
    rows = []
    for i, upper in enumerate(uppers):
        d = rng.permutation(durations[idx == i])
        if batch_sizes is not None:
            b = batch_sizes[i]
        else:
            b = max(1, int(batch_duration // upper)) if batch_duration else 1
        n_batches = int(np.ceil(len(d) / b)) if len(d) else 0
        padded = np.zeros(n_batches * b)
        padded[: len(d)] = d
        batches = padded.reshape(n_batches, b) if n_batches else np.zeros((0, b))
        sizes = (batches > 0).sum(1)
        total = (batches.max(1) * sizes).sum() if n_batches else 0.0
        rows.append({
            "bucket": i, "upper_s": round(float(upper), 2), "cuts": int(len(d)), "hours": round(float(d.sum()) / 3600, 3),
            "batch_size": int(b), "audio_s_per_batch": round(float(d.sum()) / n_batches, 1) if n_batches else 0.0,
            "padding": round(float(1 - d.sum() / total), 4) if total else 0.0, "steps_per_epoch": n_batches,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.rjust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).rjust(widths[c]) for c in COLUMNS) for r in rows]
    total_steps = sum(r["steps_per_epoch"] for r in rows)
    hours = sum(r["hours"] for r in rows)
    lines.append(f"total: {sum(r['cuts'] for r in rows)} cuts, {hours:.2f} h, {total_steps} steps per epoch")
    return "\n".join(lines)


def plot_report(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["upper_s"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, key, title in zip(axes, ("hours", "batch_size", "padding"), ("hours per bucket", "batch size", "padding")):
        ax.bar(range(len(x)), [r[key] for r in rows], color="#4c72b0")
        ax.set_xticks(range(len(x)), [f"{v:.0f}" for v in x], fontsize=7)
        ax.set_xlabel("bucket upper duration (s)")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_uppers_and_sizes(bins_path: Optional[str], sizes_path: Optional[str]) -> tuple[list[float], Optional[list[int]]]:
    """Bucket bounds and sizes: batch_sizes.yaml carries its own (merged) bounds; else bins.yaml."""
    import yaml

    if sizes_path:
        d = yaml.safe_load(Path(sizes_path).read_text())
        return [float(u) for u in d["bucket_upper_duration"]], [int(b) for b in d["batch_sizes"]]
    if not bins_path:
        raise ValueError("give --bins or --batch-sizes")
    return Bins.load(bins_path).upper, None
