"""Lhotse's DynamicBucketingSampler over lazy CutSets, wrapped for endless epochs and exact resume."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from lhotse import CutSet
from lhotse.serialization import deserialize_item
from lhotse.dataset.sampling.dynamic_bucketing import DynamicBucketingSampler, FixedBucketBatchSizeConstraint

from cuts.bins import Bins
from cuts.config import DataConfig
from cuts.dataset import SamplerItem
from cuts.io import iter_jsonl, read_yaml
from cuts.shar import is_shar, is_url, list_shards

log = logging.getLogger(__name__)


class ManifestCuts:
    """The cuts of a JSON-lines manifest (local, gzip or any URL lhotse's I/O reads), read lazily; a
    malformed line is logged with its file and line number, counted and skipped."""

    def __init__(self, source: str):
        self.source = source
        self.bad_lines = 0

    def __iter__(self):
        for where, item in iter_jsonl(self.source, on_error=self._bad):
            try:
                yield deserialize_item(item)
            except Exception as e:
                self._bad(where, f"{type(e).__name__}: {e}")

    def _bad(self, where: str, problem: str) -> None:
        self.bad_lines += 1
        log.warning("skipping %s: bad manifest line (%s)", where, problem)


def open_cuts(source: str, seed: int) -> CutSet:
    """A lazy CutSet from a manifest (jsonl/jsonl.gz, local or URL) or a Lhotse Shar folder (local or URL)."""
    source = str(source)
    if is_shar(source):
        shards = list_shards(source)
        fields = {"cuts": [s.cuts for s in shards]}
        if shards[0].recording:
            fields["recording"] = [s.recording for s in shards]
        return CutSet.from_shar(fields=fields, shuffle_shards=True, seed=seed)
    if not is_url(source) and not Path(source).is_file():
        raise FileNotFoundError(f"cuts {source!r} not found: give a CutSet manifest or a Shar folder")
    if source.endswith(".json") and not is_url(source):
        return CutSet.from_file(source)
    return CutSet(ManifestCuts(source))


def combine_cuts(sources: Sequence[str], weights: Sequence[float], seed: int) -> CutSet:
    """Several corpora as one lazy CutSet, interleaved at random with the given weights."""
    sets = [open_cuts(s, seed) for s in sources]
    if len(sets) == 1:
        return sets[0]
    if weights and len(weights) != len(sets):
        raise ValueError(f"data.train_weights has {len(weights)} entries for {len(sets)} data.train_cuts")
    return CutSet.mux(*sets, weights=list(weights) if weights else None, seed=seed)


def load_batch_sizes(path: str) -> tuple[list[float], list[int]]:
    """Bucket bounds and per-bucket batch sizes from ``prepare.py calibrate`` (batch_sizes.yaml)."""
    d = read_yaml(path, "batch sizes file", "`nest-prepare calibrate`")
    try:
        uppers = [float(u) for u in d["bucket_upper_duration"]]
        sizes = [int(b) for b in d["batch_sizes"]]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path}: needs bucket_upper_duration and batch_sizes lists (see `nest-prepare calibrate`)") from None
    if len(uppers) != len(sizes) or uppers != sorted(uppers) or not sizes or min(sizes) < 1 or \
            not all(math.isfinite(u) for u in uppers):
        raise ValueError(f"{path}: one positive batch size per bucket, bounds increasing")
    return uppers, sizes


class DurationFilter:
    """Keeps cuts with ``lo <= duration <= hi`` (a class, not a lambda, so that it pickles)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def __call__(self, cut) -> bool:
        return self.lo <= cut.duration <= self.hi


def build_sampler(
    cuts: CutSet, cfg: DataConfig, *, train: bool, seed: int, world_size: int = 1, rank: int = 0,
    bins: Optional[Bins] = None,
) -> DynamicBucketingSampler:
    """Bucketing sampler: duration-based, or per-bucket batch sizes when ``data.bucket_batch_size`` is set."""
    max_duration = cfg.max_duration
    kwargs = dict(
        shuffle=train, drop_last=train and cfg.drop_last, seed=seed, world_size=world_size, rank=rank,
        sync_buckets=True, buffer_size=max(cfg.shuffle_buffer_size, 1000), quadratic_duration=cfg.quadratic_duration,
    )
    if cfg.bucket_batch_size:
        # The calibrated file carries its own (merged) bucket bounds; data.bins is not needed with it.
        uppers, sizes = load_batch_sizes(cfg.bucket_batch_size)
        max_duration = min(max_duration, uppers[-1])
        kwargs["constraint"] = FixedBucketBatchSizeConstraint(uppers, sizes)
        kwargs["duration_bins"] = uppers
    else:
        kwargs["max_duration"] = cfg.batch_duration if train else (cfg.val_batch_duration or cfg.batch_duration)
        if bins is not None:
            kwargs["duration_bins"] = bins.duration_bins
        else:
            kwargs["num_buckets"] = cfg.num_buckets
    cuts = cuts.filter(DurationFilter(cfg.min_duration, max_duration))
    return DynamicBucketingSampler(cuts, **kwargs)


class NoBatchError(RuntimeError):
    """The sampler made no batch out of the data."""


NO_BATCH = ("the sampler made no batch: check data.min_duration/max_duration against your cut durations, and "
            "data.num_buckets or data.bins against the amount of data (with drop_last, a bucket that never fills a "
            "batch yields nothing; `prepare.py report` shows each bucket's batches)")


class EpochSampler(torch.utils.data.Sampler):
    """Yields SamplerItem(cuts, epoch, index) from a lhotse sampler, one epoch after another when
    ``endless``. ``position`` (epoch, batches already consumed) restores a run exactly: the
    consumed batches of that epoch are skipped without loading audio, nothing is repeated."""

    def __init__(self, sampler: DynamicBucketingSampler, endless: bool):
        self.sampler = sampler
        self.endless = endless
        self.position = (0, 0)

    def __iter__(self) -> Iterator[SamplerItem]:
        epoch, skip = self.position
        while True:
            self.sampler.set_epoch(epoch)
            count = 0
            for index, cuts in enumerate(self.sampler):
                count += 1
                if index >= skip:
                    yield SamplerItem(cuts=cuts, epoch=epoch, index=index)
            if count == 0:
                raise NoBatchError(NO_BATCH)
            if not self.endless:
                return
            epoch, skip = epoch + 1, 0
