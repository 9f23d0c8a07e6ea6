"""Lhotse's DynamicBucketingSampler over lazy CutSets, wrapped for endless epochs and exact resume."""
from __future__ import annotations

import logging
import math
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from lhotse import CutSet
from lhotse.qa import validate
from lhotse.serialization import deserialize_item
from lhotse.dataset.sampling.dynamic_bucketing import DynamicBucketingSampler, FixedBucketBatchSizeConstraint

from cuts.bins import MIN_BATCHES_PER_BUCKET, MIN_CUTS_PER_BUCKET, Bins, bins_from_durations, increasing_seconds
from cuts.console import error_line
from cuts.config import DataConfig
from cuts.dataset import SamplerItem
from cuts.io import ManifestError, iter_jsonl, read_yaml
from cuts.shar import is_shar, is_url, list_shards

log = logging.getLogger(__name__)
_REPORTED: set[str] = set()  # "file:line" of the bad manifest lines this process has warned about
MAX_BIN_CUTS = 10_000  # cuts read to estimate buckets when no bins are given (as many as lhotse's samplers read)


class ManifestCuts:
    """The cuts of a JSON-lines manifest (local, gzip or any URL lhotse's I/O reads), read lazily; a
    malformed line is logged with its file and line number, counted and skipped. A file that ends early (a gzip
    stream cut short, e.g. replaced or damaged while a run reads it) ends there with an error line: a multi-day
    run keeps the cuts it has instead of crashing (start-up refuses such a file: nest.training.sources)."""

    def __init__(self, source: str):
        self.source = source
        self.bad_lines = 0

    def __iter__(self):
        try:
            for where, item in iter_jsonl(self.source, on_error=self._bad):
                try:
                    cut = deserialize_item(item)
                    # lhotse builds cuts from any values: what the sampler and loaders rely on is checked here
                    # (positive durations, consistent recordings; about a tenth of the cost of reading a cut).
                    validate(cut)
                    if not isinstance(cut.id, str):
                        raise ValueError(f"its id is {cut.id!r}, not a string")
                except Exception as e:
                    self._bad(where, error_line(e))
                    continue
                yield cut
        except ManifestError as e:
            self.bad_lines += 1
            log.error("%s; the rest of it is skipped this epoch", e)

    def _bad(self, where: str, problem: str) -> None:
        self.bad_lines += 1
        # Said once per line and process: every epoch meets the same line again.
        log.log(logging.DEBUG if where in _REPORTED else logging.WARNING, "skipping %s: bad manifest line (%s)",
                where, problem)
        _REPORTED.add(where)


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
    """Bucket bounds and per-bucket batch sizes from ``nest-prepare calibrate`` (batch_sizes.yaml)."""
    d = read_yaml(path, "batch sizes file", "`nest-prepare calibrate`")
    try:
        uppers = [float(u) for u in d["bucket_upper_duration"]]
        sizes = [int(b) for b in d["batch_sizes"]]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path}: needs bucket_upper_duration and batch_sizes lists (see `nest-prepare calibrate`)") from None
    if len(uppers) != len(sizes) or not sizes or min(sizes) < 1 or not increasing_seconds(uppers):
        raise ValueError(f"{path}: needs one positive batch size per bucket and bucket bounds in positive seconds, "
                         f"strictly increasing; make it again with `nest-prepare calibrate`")
    return uppers, sizes


class DurationFilter:
    """Keeps cuts with ``lo <= duration <= hi`` (a class, not a lambda, so that it pickles)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def __call__(self, cut) -> bool:
        return self.lo <= cut.duration <= self.hi


def _batch_duration(cfg: DataConfig, train: bool) -> tuple[float, str]:
    if train or not cfg.val_batch_duration:
        return cfg.batch_duration, "data.batch_duration"
    return cfg.val_batch_duration, "data.val_batch_duration"


def duration_limits(cfg: DataConfig, train: bool = True) -> tuple[float, float, str]:
    """The durations batches take, ``lo <= duration <= hi``, and what sets ``hi`` (in words, for messages).

    ``hi`` is data.max_duration, or less: the longest calibrated bucket (data.bucket_batch_size), or the longest cut
    one batch of data.batch_duration holds (lhotse would make a batch of one longer cut anyway, over the memory
    the batch size was chosen for)."""
    hi, why = cfg.max_duration, f"data.max_duration={cfg.max_duration:g} s"
    if cfg.bucket_batch_size:
        longest = load_batch_sizes(cfg.bucket_batch_size)[0][-1]
        if longest < hi:
            hi, why = longest, f"the longest bucket of data.bucket_batch_size ({longest:g} s)"
    else:
        batch, key = _batch_duration(cfg, train)
        q = cfg.quadratic_duration
        # lhotse measures a cut as d + d^2 / quadratic_duration: the longest that fits solves d + d^2 / q = batch.
        fits = batch if not q else q * (math.sqrt(1 + 4 * batch / q) - 1) / 2
        if fits < hi:
            hi, why = fits, f"the {fits:g} s one batch of {key}={batch:g} s holds"
    return cfg.min_duration, hi, why


def estimated_bins(cuts: Iterable, cfg: DataConfig, train: bool = True) -> Bins:
    """Buckets for a run without data.bins, from the durations of the first cuts in the duration limits (as lhotse
    estimates them, with the exact edges of nest-prepare bins): at most data.num_buckets, fewer when the data is
    small, so that each holds a few cuts and batches."""
    lo, hi, _ = duration_limits(cfg, train)
    d = np.fromiter((c.duration for c in islice((c for c in cuts if lo <= c.duration <= hi), MAX_BIN_CUTS)), float)
    if not len(d):
        return Bins(upper=[hi], num_cuts=0, max_duration=hi)
    batch, _ = _batch_duration(cfg, train)
    # The number of buckets nest-prepare bins would make (asked for exactly, so that it has nothing to warn about).
    k = max(1, min(cfg.num_buckets, len(d) // MIN_CUTS_PER_BUCKET, int(d.sum() // (MIN_BATCHES_PER_BUCKET * batch))))
    return bins_from_durations(d, k, batch_duration=batch)


def build_sampler(
    cuts: CutSet, cfg: DataConfig, *, train: bool, seed: int, world_size: int = 1, rank: int = 0,
    bins: Optional[Bins] = None,
) -> DynamicBucketingSampler:
    """Bucketing sampler: duration-based, or per-bucket batch sizes when ``data.bucket_batch_size`` is set. Without
    ``bins`` they are estimated from the first cuts (``estimated_bins``)."""
    lo, hi, _ = duration_limits(cfg, train)
    cuts = cuts.filter(DurationFilter(lo, hi))
    kwargs = dict(
        shuffle=train, drop_last=train and cfg.drop_last, seed=seed, world_size=world_size, rank=rank,
        sync_buckets=True, buffer_size=max(cfg.shuffle_buffer_size, 1000), quadratic_duration=cfg.quadratic_duration,
    )
    if cfg.bucket_batch_size:
        # The calibrated file carries its own (merged) bucket bounds; data.bins is not needed with it.
        uppers, sizes = load_batch_sizes(cfg.bucket_batch_size)
        kwargs["constraint"] = FixedBucketBatchSizeConstraint(uppers, sizes)
        kwargs["duration_bins"] = uppers
    else:
        kwargs["max_duration"] = _batch_duration(cfg, train)[0]
        kwargs["duration_bins"] = (bins or estimated_bins(cuts, cfg, train)).duration_bins
    return DynamicBucketingSampler(cuts, **kwargs)


class NoBatchError(RuntimeError):
    """The sampler made no batch out of the data."""


NO_BATCH = ("the sampler made no batch: check data.min_duration/max_duration against your cut durations, and "
            "data.num_buckets or data.bins against the amount of data (with drop_last, a bucket that never fills a "
            "batch yields nothing; `nest-prepare report` shows each bucket's batches)")


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
