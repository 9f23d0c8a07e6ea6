"""Per-bucket report of a CutSet as training would batch it: a table, warnings and a PNG.

The batches come from the training sampler itself (``cuts.sampler.build_sampler``: the same bucket
edges, batch sizes or batch duration, duration filter, ``drop_last`` and world size), fed with
duration-only cuts, so steps per epoch are the sampler's, not an estimate.
"""
from __future__ import annotations

import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import yaml
from lhotse import CutSet, MonoCut

from cuts.bins import MIN_BATCHES_PER_BUCKET, MIN_CUTS_PER_BUCKET, Bins, bins_from_durations
from cuts.config import DataConfig
from cuts.io import atomic_write
from cuts.sampler import build_sampler, duration_limits, load_batch_sizes

log = logging.getLogger(__name__)
EXACT_STEPS_MAX_CUTS = 20000  # up to this many cuts, `prepare.py bins` runs an epoch of the sampler to count steps
COLUMNS = ("bucket", "upper_s", "cuts", "hours", "batch_size", "audio_s_per_batch", "padding", "steps_per_epoch")


class DurationCuts:
    """Cuts that carry only a duration (all the sampler looks at), made on the fly from an array."""

    def __init__(self, durations: np.ndarray):
        self.durations = durations

    def __iter__(self) -> Iterator[MonoCut]:
        for i, d in enumerate(self.durations):
            yield MonoCut(id=str(i), start=0.0, duration=float(d), channel=0)


def bucket_report(durations: np.ndarray, uppers: list[float], batch_sizes: Optional[list[int]],
                  batch_duration: Optional[float], seed: int = 0, *, world_size: int = 1, drop_last: bool = True,
                  min_duration: float = 0.0, max_duration: float = math.inf,
                  quadratic_duration: Optional[float] = None) -> list[dict]:
    """One row per bucket, from one epoch of the training sampler on rank 0 of ``world_size``.

    ``batch_sizes`` (one per bucket, as ``prepare.py calibrate`` writes them) or ``batch_duration``
    (seconds per batch, padding included) say how batches fill. ``never_fills`` marks a bucket whose
    cuts can never make a whole batch (with ``drop_last`` they are never trained on).
    """
    cfg = DataConfig(batch_duration=batch_duration or DataConfig.batch_duration, drop_last=drop_last,
                     min_duration=min_duration, max_duration=max_duration, quadratic_duration=quadratic_duration)
    bins = Bins(upper=list(uppers), num_cuts=len(durations), max_duration=uppers[-1])
    with tempfile.TemporaryDirectory() as tmp:
        if batch_sizes is not None:
            cfg.bucket_batch_size = str(Path(tmp) / "batch_sizes.yaml")
            Path(cfg.bucket_batch_size).write_text(yaml.safe_dump(
                {"bucket_upper_duration": list(uppers), "batch_sizes": list(batch_sizes)}))
            max_duration = min(max_duration, uppers[-1])
        sampler = build_sampler(CutSet(DurationCuts(durations)), cfg, train=True, seed=seed, world_size=world_size,
                                rank=0, bins=bins)
        sampler.set_epoch(0)
        with warnings.catch_warnings():  # lhotse's buffer-size guess (and its mean of no bin edges, for one bucket)
            warnings.simplefilter("ignore")
            batches = [np.array([c.duration for c in batch]) for batch in sampler]
    edges = np.asarray(uppers[:-1])
    kept = durations[(durations >= min_duration) & (durations <= max_duration)]
    bucket_of_cut = np.searchsorted(edges, kept, side="left")
    bucket_of_batch = [int(np.searchsorted(edges, b.max(), side="left")) for b in batches]
    rows = []
    for i, upper in enumerate(uppers):
        d = kept[bucket_of_cut == i]
        mine = [b for b, j in zip(batches, bucket_of_batch) if j == i]
        if batch_sizes is not None:
            size, needed = float(batch_sizes[i]), batch_sizes[i]
        else:
            size = float(np.mean([len(b) for b in mine])) if mine else float(max(1, cfg.batch_duration // upper))
            needed = max(1, int(cfg.batch_duration // upper))  # a batch of cuts this long holds at least that many
        audio = sum(float(b.sum()) for b in mine)
        padded = sum(float(b.max()) * len(b) for b in mine)
        rows.append({
            "bucket": i, "upper_s": round(float(upper), 2), "cuts": int(len(d)), "hours": round(float(d.sum()) / 3600, 3),
            "batch_size": round(size, 1), "audio_s_per_batch": round(audio / len(mine), 1) if mine else 0.0,
            "padding": round(1 - audio / padded, 4) if padded else 0.0, "steps_per_epoch": len(mine),
            "cuts_in_batches": sum(len(b) for b in mine),
            "never_fills": bool(len(d)) and drop_last and (len(d) < needed or not mine),
        })
    return rows


def training_bins(durations: np.ndarray, cfg: DataConfig, num_buckets: int, min_cuts_per_bucket: int = MIN_CUTS_PER_BUCKET,
                  min_batches_per_bucket: float = MIN_BATCHES_PER_BUCKET, seed: int = 0) -> tuple[Bins, dict]:
    """Bins of the cuts training keeps (:func:`duration_limits`: data.min_duration to data.max_duration, or less when
    one batch holds less), each bucket holding several batches of ``cfg.batch_duration``, and what they give: the
    cuts the duration filter leaves out, and one epoch of the training sampler (counted exactly up to
    EXACT_STEPS_MAX_CUTS cuts). A corpus too small to fill a few batches gets a warning that says so and what to
    change."""
    lo, hi, why = duration_limits(cfg)
    kept = durations[(durations >= lo) & (durations <= hi)]
    if not len(kept):
        raise ValueError(f"none of the {len(durations)} cuts lies within data.min_duration={lo:g} s..{why}, they span "
                         f"{durations.min():.2f}..{durations.max():.2f} s: change those settings, or prepare with "
                         "--window")
    if len(kept) < len(durations):
        left = durations[(durations < lo) | (durations > hi)]
        short = left[left < lo]
        hints = ([f"set data.min_duration={max(0.1, math.floor(10 * short.min()) / 10):g} to keep the {len(short)} "
                  "shorter ones"] if len(short) else []) + \
            (["prepare with --window S to cut long recordings into windows it keeps"] if len(short) < len(left) else [])
        log.warning("%d of %d cuts (%.2f h) lie outside data.min_duration=%g s..%s: training leaves them out, and "
                    "so do the bins; %s", len(left), len(durations), left.sum() / 3600, lo, why, "; ".join(hints))
    B = cfg.batch_duration
    bins = bins_from_durations(kept, num_buckets, min_cuts_per_bucket, B, min_batches_per_bucket)
    total = float(kept.sum())
    info = {"num_buckets": len(bins.upper), "batch_duration": B, "num_cuts": len(kept), "hours": round(total / 3600, 3),
            "cuts_outside_duration_range": int(len(durations) - len(kept)), "steps_per_epoch": None,
            "cuts_in_no_batch": None, "tiny": total < min_batches_per_bucket * B}
    if len(kept) <= EXACT_STEPS_MAX_CUTS:
        rows = bucket_report(kept, bins.upper, None, B, seed, drop_last=cfg.drop_last,
                             quadratic_duration=cfg.quadratic_duration)
        info["steps_per_epoch"] = sum(r["steps_per_epoch"] for r in rows)
        info["cuts_in_no_batch"] = len(kept) - sum(r["cuts_in_batches"] for r in rows)
    if info["tiny"]:
        suggest = max(math.ceil(kept.max()), math.floor(total / min_batches_per_bucket))
        if info["steps_per_epoch"] == 0 or (info["steps_per_epoch"] is None and total < B):
            log.warning("the corpus is tiny for data.batch_duration=%g s: its %d cuts (%.0f s of audio) make no whole "
                        "batch, so with data.drop_last=true an epoch would train on nothing; set data.batch_duration=%d "
                        "(a quarter of the corpus) or data.drop_last=false", B, len(kept), total, suggest)
        else:
            log.warning("the corpus is tiny for data.batch_duration=%g s: its %d cuts (%.0f s of audio) fill one "
                        "bucket and make %s step(s) per epoch%s; for more steps set data.batch_duration=%d", B,
                        len(kept), total, info["steps_per_epoch"] if info["steps_per_epoch"] is not None
                        else f"about {total / B:.0f}", f", {info['cuts_in_no_batch']} cuts in no batch"
                        if info["cuts_in_no_batch"] else "", suggest)
    return bins, info


def format_table(rows: list[dict], world_size: int = 1) -> str:
    """The rows as a table, a total line, and one line per bucket that never fills a batch."""
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.rjust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).rjust(widths[c]) for c in COLUMNS) for r in rows]
    cuts = sum(r["cuts"] for r in rows)
    rank = f" on each of {world_size} ranks" if world_size > 1 else ""
    lines.append(f"total: {cuts} cuts, {sum(r['hours'] for r in rows):.2f} h, "
                 f"{sum(r['steps_per_epoch'] for r in rows)} steps per epoch{rank}")
    for r in rows:
        if r["never_fills"]:
            lines.append(f"bucket {r['bucket']} (up to {r['upper_s']} s): its {r['cuts']} cuts never fill a batch, so "
                         "they are never trained on: make fewer buckets (prepare.py bins --buckets), lower the batch "
                         "size or data.batch_duration, or set data.drop_last=false")
    return "\n".join(lines)


def plot_report(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["upper_s"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, key, title in zip(axes, ("hours", "batch_size", "padding"), ("hours per bucket", "batch size", "padding")):
        ax.bar(range(len(x)), [r[key] for r in rows], color="#4c72b0")
        ax.set_xticks(range(len(x)), [f"{v:.1f}" for v in x], fontsize=7)
        ax.set_xlabel("bucket upper duration (s)")
        ax.set_title(title)
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def load_uppers_and_sizes(bins_path: Optional[str], sizes_path: Optional[str]) -> tuple[list[float], Optional[list[int]]]:
    """Bucket bounds and sizes: batch_sizes.yaml carries its own (merged) bounds; else bins.yaml."""
    if sizes_path:
        return load_batch_sizes(sizes_path)
    if not bins_path:
        raise ValueError("give --bins or --batch-sizes (or --config whose data.bins or data.bucket_batch_size is set)")
    return Bins.load(bins_path).upper, None
