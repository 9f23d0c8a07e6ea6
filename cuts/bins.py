"""Duration bins for bucketing: estimated by streaming over a CutSet, stored as bins.yaml."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import yaml
from lhotse import CutSet
from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets


@dataclass
class Bins:
    """Bucket ``i`` holds cuts with ``upper[i-1] <= duration < upper[i]`` (``upper[-1]``: longest cut)."""

    upper: list[float]  # seconds, one per bucket, increasing
    num_cuts: int
    max_duration: float

    @property
    def duration_bins(self) -> list[float]:
        """Boundaries between buckets, as lhotse's DynamicBucketingSampler takes them."""
        return self.upper[:-1]

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(
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


class _DurationTap:
    """Passes cuts through while keeping their durations (4 bytes each) for the histogram."""

    def __init__(self, cuts: Iterable):
        self.cuts = cuts
        self.durations: list[float] = []

    def __iter__(self):
        for cut in self.cuts:
            self.durations.append(cut.duration)
            yield cut


def estimate_bins(cuts: CutSet, num_buckets: int) -> tuple[Bins, np.ndarray]:
    """Bins with about equal total duration per bucket, in one streaming pass; also the durations."""
    tap = _DurationTap(cuts)
    boundaries = estimate_duration_buckets(tap, num_buckets=num_buckets)
    durations = np.asarray(tap.durations, dtype=np.float32)
    if len(durations) == 0:
        raise ValueError("cannot estimate bins from an empty CutSet")
    longest = float(durations.max())
    upper = [float(b) for b in boundaries if b < longest] + [longest]
    return Bins(upper=upper, num_cuts=len(durations), max_duration=longest), durations


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
