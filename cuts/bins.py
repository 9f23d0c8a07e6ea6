"""Duration bins for bucketing: estimated in one streaming pass over a CutSet, stored as bins.yaml."""
from __future__ import annotations

import logging
import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import yaml

from cuts.io import atomic_write, iter_jsonl, read_yaml, write_text

log = logging.getLogger(__name__)
MIN_CUTS_PER_BUCKET = 5  # fewer cuts than this in a bucket hardly ever make a batch of their own
# A bucket drops its last, incomplete batch every epoch (drop_last): with 4 batches at least, that is under an eighth
# of its cuts on average, and a bucket never waits a whole epoch without filling one.
MIN_BATCHES_PER_BUCKET = 4


def increasing_seconds(upper: list[float]) -> bool:
    """Whether bucket bounds are positive, finite seconds in strictly increasing order."""
    return all(math.isfinite(u) and u > 0 for u in upper) and all(a < b for a, b in zip(upper, upper[1:]))


@dataclass
class Bins:
    """Bucket ``i`` holds cuts with ``upper[i-1] < duration <= upper[i]``, as lhotse's samplers assign
    them; ``upper[-1]`` is the longest cut's duration, exactly."""

    upper: list[float]  # seconds, one per bucket, strictly increasing
    num_cuts: int
    max_duration: float
    batch_duration: Optional[float] = None  # data.batch_duration the buckets were made to fill (None: not known)

    @property
    def duration_bins(self) -> list[float]:
        """Boundaries between buckets, as lhotse's DynamicBucketingSampler takes them. A single bucket gets its
        upper bound as a boundary (with nothing above it): lhotse averages the boundaries, and warns when there are
        none."""
        return self.upper[:-1] or self.upper[-1:]

    def save(self, path: Path) -> None:
        d = {"num_buckets": len(self.upper), "bucket_upper_duration": self.upper, "num_cuts": self.num_cuts,
             "max_duration": self.max_duration}
        if self.batch_duration is not None:
            d["batch_duration"] = self.batch_duration
        write_text(path, yaml.safe_dump(d, sort_keys=False))

    @staticmethod
    def load(path: Path) -> "Bins":
        """bins.yaml as ``nest-prepare bins`` writes it; anything else is one error naming the file and the fix."""
        made_by = "`nest-prepare bins`"
        d = read_yaml(path, "bins file", made_by)
        upper = d.get("bucket_upper_duration") if isinstance(d, dict) else None
        try:
            upper = [float(x) for x in upper]
            num_cuts = int(d.get("num_cuts", 0))
            max_duration = float(d.get("max_duration", upper[-1] if upper else 0.0))
            batch_duration = None if d.get("batch_duration") is None else float(d["batch_duration"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: needs a bucket_upper_duration list of seconds (and numbers for num_cuts, "
                             f"max_duration); make it with {made_by}") from None
        if not upper or not increasing_seconds(upper):
            raise ValueError(f"{path}: bucket_upper_duration must be a non-empty, strictly increasing list of positive "
                             f"seconds, not {upper}; make it with {made_by}")
        return Bins(upper=upper, num_cuts=num_cuts, max_duration=max_duration, batch_duration=batch_duration)


def manifest_durations(path: Path) -> np.ndarray:
    """Durations (float64, in file order) of a CutSet manifest, read line by line without building cuts."""
    out = array("d")
    for where, d in iter_jsonl(path):
        try:
            out.append(float(d["duration"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: no numeric duration; is this a CutSet manifest?") from None
    return np.frombuffer(out, dtype=np.float64) if len(out) else np.zeros(0)


def bins_from_durations(durations: np.ndarray, num_buckets: int, min_cuts_per_bucket: int = MIN_CUTS_PER_BUCKET,
                        batch_duration: Optional[float] = None,
                        min_batches_per_bucket: float = MIN_BATCHES_PER_BUCKET) -> Bins:
    """Buckets of about equal total duration (lhotse's criterion), with exact edges: every edge is a
    cut's duration, edges strictly increase, the last one is the longest cut, and no bucket holds
    fewer than ``min_cuts_per_bucket`` cuts, nor (given ``batch_duration``, the seconds of one batch) less than
    ``min_batches_per_bucket`` batches of audio, unless a single bucket is left. The number of buckets is capped to
    what the data holds, with a warning saying so (not when even one bucket falls short: that caller says so)."""
    d = np.sort(np.asarray(durations, dtype=np.float64))
    if len(d) == 0:
        raise ValueError("cannot estimate bins from an empty CutSet")
    if num_buckets < 1 or min_cuts_per_bucket < 1:
        raise ValueError("--buckets and --min-cuts-per-bucket must be at least 1")
    if batch_duration is not None and not (batch_duration > 0 and min_batches_per_bucket > 0):
        raise ValueError("--batch-duration and --min-batches-per-bucket must be above 0")
    longest, total = float(d[-1]), float(d.sum())
    min_seconds = batch_duration * min_batches_per_bucket if batch_duration else 0.0
    k = max(1, min(num_buckets, len(d) // min_cuts_per_bucket, int(total // min_seconds) if min_seconds else len(d)))
    cum = np.cumsum(d)
    prefix = np.concatenate([[0.0], cum])  # seconds before cut i
    targets = cum[-1] * np.arange(1, k) / k
    edges = np.unique(d[np.minimum(np.searchsorted(cum, targets, side="left"), len(d) - 1)])
    edges = edges[edges < longest]
    while len(edges):  # merge the least filled bucket into its less filled neighbour until all are full enough
        ends = np.concatenate([[0], np.searchsorted(d, edges, side="right"), [len(d)]])
        fill = np.diff(ends) / min_cuts_per_bucket
        if min_seconds:
            fill = np.minimum(fill, np.diff(prefix[ends]) / min_seconds)
        i = int(np.argmin(fill))
        if fill[i] >= 1:
            break
        left = fill[i - 1] if i > 0 else np.inf
        right = fill[i + 1] if i < len(edges) else np.inf
        edges = np.delete(edges, i - 1 if left <= right else i)
    upper = [float(e) for e in edges] + [longest]
    if len(upper) < num_buckets and total >= min_seconds:  # less audio than that: the caller says the corpus is tiny
        need = f"at least {min_cuts_per_bucket} cuts" + (
            f" and {min_batches_per_bucket:g} batches of {batch_duration:g} s" if min_seconds else "")
        log.warning("%d cuts fill %d bucket(s) of %s each (%.0f s of audio in all), not the %d asked for "
                    "(--min-cuts-per-bucket%s set that minimum)", len(d), len(upper), need, total, num_buckets,
                    " and --min-batches-per-bucket" if min_seconds else "")
    return Bins(upper=upper, num_cuts=len(d), max_duration=longest, batch_duration=batch_duration)


def estimate_bins(cuts: Iterable, num_buckets: int, min_cuts_per_bucket: int = MIN_CUTS_PER_BUCKET
                  ) -> tuple[Bins, np.ndarray]:
    """Bins of ``cuts`` (any iterable of cuts, read once, lazily) and their durations."""
    durations = array("d", (c.duration for c in cuts))
    d = np.frombuffer(durations, dtype=np.float64) if len(durations) else np.zeros(0)
    return bins_from_durations(d, num_buckets, min_cuts_per_bucket), d


def plot_bins(durations: np.ndarray, bins: Bins, path: Path, title: Optional[str] = None) -> None:
    """Histogram of durations with the bucket edges drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.hist(durations, bins=200, color="#4c72b0")
    for edge in bins.upper:
        ax.axvline(edge, color="#dd8452", linewidth=0.8)
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("cuts")
    ax.set_title(title or f"{len(durations)} cuts, {len(bins.upper)} buckets")
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
