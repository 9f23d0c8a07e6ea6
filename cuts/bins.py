"""Duration bins for bucketing: estimated in one streaming pass over a CutSet, stored as bins.yaml."""
from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import yaml

from cuts.io import atomic_write, iter_jsonl, write_text

log = logging.getLogger(__name__)
MIN_CUTS_PER_BUCKET = 5  # fewer cuts than this in a bucket hardly ever make a batch of their own


@dataclass
class Bins:
    """Bucket ``i`` holds cuts with ``upper[i-1] < duration <= upper[i]``, as lhotse's samplers assign
    them; ``upper[-1]`` is the longest cut's duration, exactly."""

    upper: list[float]  # seconds, one per bucket, strictly increasing
    num_cuts: int
    max_duration: float

    @property
    def duration_bins(self) -> list[float]:
        """Boundaries between buckets, as lhotse's DynamicBucketingSampler takes them."""
        return self.upper[:-1]

    def save(self, path: Path) -> None:
        write_text(path, yaml.safe_dump(
            {"num_buckets": len(self.upper), "bucket_upper_duration": self.upper,
             "num_cuts": self.num_cuts, "max_duration": self.max_duration},
            sort_keys=False,
        ))

    @staticmethod
    def load(path: Path) -> "Bins":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bins file {path} does not exist; make it with `prepare.py bins`")
        d = yaml.safe_load(path.read_text())
        try:
            upper = [float(x) for x in d["bucket_upper_duration"]]
        except (TypeError, KeyError):
            raise ValueError(f"{path} has no bucket_upper_duration list; make it with `prepare.py bins`") from None
        if upper != sorted(upper) or not upper:
            raise ValueError(f"{path}: bucket_upper_duration must be a non-empty increasing list")
        return Bins(upper=upper, num_cuts=int(d.get("num_cuts", 0)), max_duration=float(d.get("max_duration", upper[-1])))


def manifest_durations(path: Path) -> np.ndarray:
    """Durations (float64, in file order) of a CutSet manifest, read line by line without building cuts."""
    out = array("d")
    for where, d in iter_jsonl(path):
        try:
            out.append(float(d["duration"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: no numeric duration; is this a CutSet manifest?") from None
    return np.frombuffer(out, dtype=np.float64) if len(out) else np.zeros(0)


def bins_from_durations(durations: np.ndarray, num_buckets: int, min_cuts_per_bucket: int = MIN_CUTS_PER_BUCKET) -> Bins:
    """Buckets of about equal total duration (lhotse's criterion), with exact edges: every edge is a
    cut's duration, edges strictly increase, the last one is the longest cut, and no bucket holds
    fewer than ``min_cuts_per_bucket`` cuts (unless there are fewer cuts than that in all). The number
    of buckets is capped to what the data holds, with a warning saying so."""
    d = np.sort(np.asarray(durations, dtype=np.float64))
    if len(d) == 0:
        raise ValueError("cannot estimate bins from an empty CutSet")
    if num_buckets < 1 or min_cuts_per_bucket < 1:
        raise ValueError("--buckets and --min-cuts-per-bucket must be at least 1")
    longest = float(d[-1])
    k = max(1, min(num_buckets, len(d) // min_cuts_per_bucket))
    cum = np.cumsum(d)
    targets = cum[-1] * np.arange(1, k) / k
    edges = np.unique(d[np.minimum(np.searchsorted(cum, targets, side="left"), len(d) - 1)])
    edges = edges[edges < longest]
    while len(edges):  # merge the smallest bucket into its smaller neighbour until all are big enough
        counts = np.diff(np.concatenate([[0], np.searchsorted(d, edges, side="right"), [len(d)]]))
        i = int(np.argmin(counts))
        if counts[i] >= min_cuts_per_bucket:
            break
        left = counts[i - 1] if i > 0 else np.inf
        right = counts[i + 1] if i < len(edges) else np.inf
        edges = np.delete(edges, i - 1 if left <= right else i)
    upper = [float(e) for e in edges] + [longest]
    if len(upper) < num_buckets:
        log.warning("%d cuts fill %d bucket(s) of at least %d cuts each, not the %d asked for "
                    "(--min-cuts-per-bucket sets that minimum)", len(d), len(upper), min_cuts_per_bucket, num_buckets)
    return Bins(upper=upper, num_cuts=len(d), max_duration=longest)


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
