"""The training data at start-up, from its cut manifests alone (no audio): what the duration limits leave out,
whether an epoch of a small corpus holds a batch, and whether given bins fit the corpus. DataFeed.preflight
reports it: one line for each thing that would otherwise go unnoticed for the whole run."""
from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Callable, Optional

from lhotse import CutSet

from cuts.bins import Bins
from cuts.config import DataConfig
from cuts.sampler import duration_limits

log = logging.getLogger(__name__)
TINY_BATCHES = 10  # an epoch of fewer batches than this is a tiny corpus: the run says so


class DataSetupError(ValueError):
    """The data cannot be used as configured; the message says what to change."""


def _hours(cuts: list) -> str:
    seconds = sum(c.duration for c in cuts)
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def _window_hint(hi: float, why: str) -> str:
    """How to train on cuts longer than ``hi`` seconds (``why``: what sets that limit)."""
    window = max(1, int(min(30.0, hi)))
    hint = (f"prepare the set again with --window {window} (any `nest-prepare` set command: long recordings become "
            f"{window} s windows)")
    return hint + (", or raise data.batch_duration" if "batch_duration" in why else "")


def kept_cuts(cuts: list, cfg: DataConfig, whole: bool) -> list:
    """The cuts of ``cuts`` (the whole corpus, or its first cuts when not ``whole``) that batches take; says how
    many cuts and hours the duration limits leave out (an error when that is all of them)."""
    lo, hi, why = duration_limits(cfg)
    kept = [c for c in cuts if lo <= c.duration <= hi]
    long = [c for c in cuts if c.duration > hi]
    short = [c for c in cuts if c.duration < lo]
    parts = []
    if long:
        parts.append(f"{len(long)} longer than {why} ({_hours(long)}, up to {max(c.duration for c in long):.0f} s)")
    if short:
        parts.append(f"{len(short)} shorter than data.min_duration={lo:g} s ({_hours(short)})")
    if not parts:
        return kept
    fix = _window_hint(hi, why) if long else "lower data.min_duration"
    of = f"the {len(cuts)} cuts" if whole else f"the first {len(cuts)} cuts"
    if not kept:
        raise DataSetupError(f"data.train_cuts: no cut is trained on, of {of}: {'; '.join(parts)}; {fix}")
    log.warning("data.train_cuts: %d of %s (%s) are never trained on: %s; %s", len(long) + len(short), of,
                _hours(long + short), "; ".join(parts), fix)
    return kept


def _epoch(cuts: list, cfg: DataConfig, make_sampler: Callable) -> tuple[int, set]:
    """Batches of one epoch of ``cuts`` with ``cfg`` on one rank, and the ids of the cuts they take."""
    with warnings.catch_warnings():  # lhotse warns that a list of cuts is not lazy: it is small on purpose
        warnings.simplefilter("ignore", UserWarning)
        sampler = make_sampler(CutSet(cuts), cfg)
        sampler.set_epoch(0)
        batches = [[c.id for c in b] for b in sampler]
    return len(batches), {i for b in batches for i in b}


def small_corpus(kept: list, cfg: DataConfig, make_sampler: Callable) -> DataConfig:
    """A corpus read whole at start-up (``kept``: its cuts within the duration limits): an epoch that
    data.drop_last would leave empty keeps each bucket's last batch instead (the returned config says so), cuts no
    batch takes are counted, and a tiny corpus is called tiny. ``make_sampler(cuts, cfg)`` is the training
    sampler on one rank."""
    batches, used = _epoch(kept, cfg, make_sampler)
    if not batches and cfg.drop_last:
        cfg = replace(cfg, drop_last=False)
        batches, used = _epoch(kept, cfg, make_sampler)
        log.warning("no bucket of these %d cuts (%s) fills a batch of data.batch_duration=%g s, so data.drop_last=true "
                    "would leave every epoch empty: each bucket's last, incomplete batch is kept instead", len(kept),
                    _hours(kept), cfg.batch_duration)
    unused = len(kept) - len(used)
    if cfg.drop_last and unused > 0.1 * len(kept):
        log.warning("%d of the %d cuts (%.0f%%) are in no batch of an epoch (data.batch_duration=%g s): each "
                    "bucket's last, incomplete batch is dropped (data.drop_last=true), and the cuts of a bucket "
                    "that never fills a batch are never trained on; lower data.batch_duration, make fewer "
                    "buckets (nest-prepare bins --buckets), or set data.drop_last=false (`nest-prepare report` shows "
                    "each bucket)", unused, len(kept), 100 * unused / max(len(kept), 1), cfg.batch_duration)
    if 0 < batches < TINY_BATCHES:
        log.warning("a tiny corpus: %d cuts, %s of audio, an epoch of %d batch(es): training sees the same audio "
                    "again every %d step(s); enough for a trial run, pretraining wants hundreds of hours", len(kept),
                    _hours(kept), batches, batches)
    return cfg


def check_bins(kept: list, bins: Optional[Bins], whole: bool) -> None:
    """Warn when data.bins look like another corpus's: many cuts the batches take are longer than their last edge."""
    if bins is None or not kept:
        return
    over = [c for c in kept if c.duration > bins.max_duration]
    if len(over) > 0.05 * len(kept):
        of = f"the {len(kept)} cuts" if whole else f"the first {len(kept)} cuts"
        log.warning("data.bins (longest duration %.2f s) look like another corpus's: %d of %s trained on are longer "
                    "(up to %.2f s) and all share the last bucket; run `nest-prepare bins` on this corpus",
                    bins.max_duration, len(over), of, max(c.duration for c in over))
