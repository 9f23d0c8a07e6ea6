"""The training data feed: lazy CutSets -> sampler -> workers -> AudioNoiseBatch, with a resumable position.

Two input paths:
- JSON-lines manifests (one node): lhotse's DynamicBucketingSampler runs in the training process over the
  global stream and hands each rank its batches (synced buckets); workers load audio. Position: (epoch,
  batches consumed), equal on every rank.
- Lhotse Shar folders (many nodes): each dataloader worker of each rank runs its own sampler over its own
  shards (cuts/shar.py); the training process does no sampling. Position: per rank and worker.
Both positions are committed at the end of an accumulation window, after the optimizer step, so a
checkpoint resumes exactly where its weights stand. When the world size, the seed, the inputs or the
bucketing settings differ from the checkpoint's, the position of the interrupted epoch has no meaning
any more: the run says what changed and starts the next epoch (nothing of the new epochs repeats or is
skipped; the rest of the interrupted epoch is not seen).

Plain Python: nest.training's LightningDataModule hands it the world size and rank once they are known
(``place``) and passes Lightning's hooks through.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import warnings
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lhotse import CutSet
from lhotse.serialization import deserialize_item

from cuts.bins import Bins
from cuts.buffers import SharedBuffers
from cuts.console import error_line
from cuts.cpus import resolve_workers
from cuts.config import DataConfig
from cuts.dataset import NestDataset, at_rate, keep_freed_memory, load_mono
from cuts.mixing import NoiseBank
from cuts.io import sha256_file
from cuts.noise import NoiseMixer
from cuts.sampler import (NO_BATCH, DurationFilter, EpochSampler, NoBatchError, build_sampler, combine_cuts,
                          estimated_bins, open_cuts)
from cuts.shar import LazyCuts, SharStream, ShardProblems, is_shar, is_url, list_shards, shard_cuts
from cuts.survey import DataSetupError, check_bins, kept_cuts, small_corpus

log = logging.getLogger(__name__)


class PackedCuts:
    """A read-only sequence of cuts kept as one block of JSON bytes: a large noise set costs a few hundred
    bytes a cut instead of a Python object graph, and forked dataloader workers share it (nothing in it
    is written after the fork)."""

    def __init__(self, cuts):
        blobs = [json.dumps(c.to_dict()).encode() for c in cuts]
        self.offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self.blob = b"".join(blobs)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        start, end = self.offsets[i], self.offsets[i + 1]
        return deserialize_item(json.loads(self.blob[start:end]))


def load_noise(sources: list[str], sample_rate: int, seed: int) -> PackedCuts:
    """Noise cuts for random access, resampled (lazily, on load) to the model's rate."""
    for s in sources:
        if is_shar(s):
            raise ValueError(f"data.noise_cuts: {s} is a Shar folder; noise needs random access: give the "
                             f"CutSet manifest of `nest-prepare noise`")
    noise = PackedCuts(at_rate(c, sample_rate) for s in sources for c in open_cuts(s, seed))
    if sources and not len(noise):
        raise ValueError(f"data.noise_cuts {sources} hold no cuts")
    return noise


class WorkerInit:
    """Seeds Python, NumPy and torch in each dataloader worker from (run seed, rank, worker id), and lets the
    worker reuse the memory of its past batches (cuts.dataset.keep_freed_memory)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        s = (self.seed * 1_000_003 + self.rank * 1009 + worker_id) % 2**32
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        keep_freed_memory()


class SkipFirst:
    """Iterates ``loader`` and drops its first ``n`` items (a resumed Shar run's replayed batches)."""

    def __init__(self, loader: torch.utils.data.DataLoader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        return islice(iter(self.loader), self.n, None)


def noise_bank(cfg: DataConfig, noise: PackedCuts, seed: int) -> Optional[NoiseBank]:
    """The seeded sample of the noise set that lives on the device (data.noise_bank_seconds), or None."""
    if cfg.noise_bank_seconds <= 0 or not len(noise):
        return None
    bank = NoiseBank.sample(noise, cfg.noise_bank_seconds, seed)
    log.info("noise bank: %d noise cuts, %.0f s (%.0f MB on the device)", len(bank.cuts),
             bank.num_samples / max(1, bank.cuts[0].sampling_rate), bank.num_samples * 4 / 1e6)
    return bank


def data_knobs(feed: "DataFeed") -> str:
    """What would feed this run's training step faster, given its settings (for the data-wait warning)."""
    c = feed.cfg
    auto = resolve_workers("auto", max(1, feed.local_world_size))
    knobs = [f"data.num_workers (now {feed.num_workers}; auto gives {auto} on this machine)"]
    if not feed.shar:
        knobs.append("Lhotse Shar shards with WAV audio (`nest-prepare shar CUTS OUT --audio-format wav`: no "
                     "decoding, twice the bytes of FLAC)")
    else:
        knobs.append("shards with WAV audio if these hold FLAC (`nest-prepare shar --audio-format wav`)")
    if not c.mix_on_device:
        knobs.append("data.mix_on_device=true data.noise_bank_seconds=3600 (workers then decode clean audio only)")
    elif c.noise_bank_seconds <= 0:
        knobs.append("data.noise_bank_seconds=3600 (noise from device memory: workers decode clean audio only)")
    return "; ".join(knobs)


def _digest(path: Optional[str]) -> Optional[str]:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12] if path and Path(path).is_file() else path


def content_digest(source: str) -> Optional[str]:
    """What a training set holds, by its bytes: a manifest's, or the cut manifests of a Shar folder's shards (None
    for a URL). A set prepared again at the same path is another set."""
    if is_url(source):
        return None
    if is_shar(source):
        names = sorted(Path(source).glob("cuts.*.jsonl*"))
        return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}" for p in names).encode()).hexdigest()[:16]
    return sha256_file(source)[:16]


class DataFeed:
    """Training and validation loaders of a run and their position (``state_dict``), on one rank."""

    def __init__(self, cfg: DataConfig, sample_rate: int, seed: int, with_targets: bool = False):
        self.cfg = cfg
        self.with_targets = with_targets  # batches carry each cut's k-means labels
        self.sample_rate = sample_rate
        self.seed = seed
        kinds = {is_shar(s) for s in cfg.train_cuts}
        if len(kinds) > 1:
            raise ValueError("data.train_cuts mixes Shar folders and manifests: give one kind")
        self.shar = kinds == {True}
        self.bins = Bins.load(cfg.bins) if cfg.bins else None
        self.epoch, self.batches_done = 0, 0  # map-style position
        self.last: dict[int, tuple[int, int]] = {}  # Shar: worker -> (epoch, index) of its last consumed batch
        self.consumed = 0  # Shar: batches consumed by this rank
        self._pending: list = []
        self._contents: Optional[list] = None  # content_digest of each of data.train_cuts
        self.world_size, self.rank, self.pin_memory, self.local_world_size = 1, 0, False, 1
        self.num_workers = resolve_workers(cfg.num_workers, 1)
        self.bank: Optional[NoiseBank] = None  # the noise bank of the training loader (data.noise_bank_seconds)

    # ---- set-up ------------------------------------------------------------------------------------
    def place(self, world_size: int, rank: int, pin_memory: bool, local_world_size: int = 1) -> None:
        """Where this process stands: the world size and its rank, whether batches go to a CUDA device, and how
        many ranks share this machine (data.num_workers=auto)."""
        self.world_size, self.rank, self.pin_memory = world_size, rank, pin_memory
        self.local_world_size = local_world_size
        self.num_workers = resolve_workers(self.cfg.num_workers, local_world_size)

    def _rank(self) -> tuple[int, int]:
        return self.world_size, self.rank

    def _workers(self) -> int:
        return max(1, self.num_workers)

    def _shar_bins(self) -> Bins:
        """Bins estimated from the first cut manifests (no audio), when data.bins is not given: every worker's
        sampler buckets alike."""
        problems = ShardProblems()
        cuts = (c for s in self.cfg.train_cuts for shard in list_shards(s) for c in shard_cuts(shard, False, problems))
        return estimated_bins(cuts, self.cfg)

    def meaning(self) -> dict[str, Any]:
        """What the position means; a resume with other values cannot continue the interrupted epoch."""
        world, _ = self._rank()
        c = self.cfg
        if self._contents is None:  # hashed once: checkpoints are written often
            self._contents = [content_digest(s) for s in c.train_cuts]
        return {"world_size": world, "seed": self.seed, "train_cuts": list(c.train_cuts), "contents": self._contents,
                "train_weights": list(c.train_weights), "bins": _digest(c.bins),
                "bucket_batch_size": _digest(c.bucket_batch_size), "batch_duration": c.batch_duration,
                "min_duration": c.min_duration, "max_duration": c.max_duration, "drop_last": c.drop_last,
                "shuffle_buffer_size": c.shuffle_buffer_size, "num_buckets": c.num_buckets,
                "workers": self._workers() if self.shar else None}

    def _sampler(self, cuts: CutSet, seed: int, world: int, rank: int, train: bool = True):
        return build_sampler(cuts, self.cfg, train=train, seed=seed, world_size=world, rank=rank, bins=self.bins)

    def preflight(self, max_cuts: int = 2000) -> None:
        """Fail before training when no batch can be made or no audio loads; warn when the bins look like another
        corpus's. Reads cut manifests, plus the audio of a few cuts."""
        if self.shar:
            problems = ShardProblems()
            cuts = CutSet(LazyCuts(lambda: (c for s in self.cfg.train_cuts for shard in list_shards(s)
                                          for c in shard_cuts(shard, False, problems))))
            audio = islice(shard_cuts(list_shards(self.cfg.train_cuts[0])[0], True, problems), 3)
        else:
            cuts = combine_cuts(self.cfg.train_cuts, self.cfg.train_weights, self.seed)
            audio = None
        seen = list(islice(iter(cuts), max_cuts))
        whole = len(seen) < max_cuts  # the whole corpus was read
        kept = kept_cuts(seen, self.cfg, whole)
        if self.shar and self.bins is None:
            self.bins = self._shar_bins()
        if not self.shar and whole:
            self.cfg = small_corpus(kept, self.cfg, lambda c, cfg: build_sampler(c, cfg, train=True, seed=self.seed,
                                                                                 bins=self.bins))
        with warnings.catch_warnings():  # lhotse warns that a list of cuts is not lazy: it is small on purpose
            warnings.simplefilter("ignore", UserWarning)
            first = next(iter(self._sampler(CutSet(seen) if whole else cuts, self.seed, 1, 0)), None)
        if first is None:
            raise NoBatchError(NO_BATCH)
        errors = []
        for cut in (audio if audio is not None else islice(first, 3)):
            try:
                load_mono(at_rate(cut, self.sample_rate))
                errors = []
                break
            except Exception as e:
                errors.append(f"{cut.id}: {error_line(e)}")
        if errors:
            raise DataSetupError("the audio of the first cuts does not load (" + "; ".join(errors) + "): check that "
                                 "the paths in the manifest exist on this machine")
        check_bins(kept, self.bins if self.cfg.bins else None, whole)

    # ---- loaders ------------------------------------------------------------------------------------
    def _loader(self, dataset, sampler=None, seed: int = 0) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers,
            worker_init_fn=WorkerInit(seed, self.rank), persistent_workers=False, pin_memory=self.pin_memory,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )

    def _train_dataset(self, read_timeout: float) -> NestDataset:
        """Workers send 16-bit audio as int16, and recycle their shared memory when batches are pinned; the
        module ``prepare``s each batch on the device."""
        noise = load_noise(self.cfg.noise_cuts, self.sample_rate, self.seed)
        self.bank = noise_bank(self.cfg, noise, self.seed)
        mixer = NoiseMixer(self.cfg.noise, self.bank.cuts if self.bank is not None else noise)
        recycle = self.pin_memory and self.num_workers > 0
        return NestDataset(self.sample_rate, mixer, self.seed, read_timeout, self.with_targets,
                           mix_on_device=self.cfg.mix_on_device, bank=self.bank, pcm16=True,
                           buffers=SharedBuffers(self.num_workers) if recycle else None)

    def train_dataloader(self):
        world, rank = self._rank()
        if not self.shar:
            cuts = combine_cuts(self.cfg.train_cuts, self.cfg.train_weights, self.seed)
            sampler = EpochSampler(self._sampler(cuts, self.seed, world, rank), endless=True)
            sampler.position = (self.epoch, self.batches_done)
            return self._loader(self._train_dataset(self.cfg.read_timeout), sampler, self.seed)
        if self.bins is None:
            self.bins = self._shar_bins()
        W = self._workers()
        shards = sum(len(list_shards(s)) for s in self.cfg.train_cuts)
        if shards < world * W:
            raise DataSetupError(f"data.train_cuts has {shards} Shar shards for {world * W} streams (world size "
                                 f"{world} x data.num_workers): every stream needs one; export with a smaller "
                                 f"--shard-size or lower data.num_workers")
        offset = self.consumed % W
        starts = {}
        for w in range(W):
            e, i = self.last.get(w, (self.epoch, -1))
            starts[w] = (e, i) if w < offset else (e, i + 1)
        stream = SharStream(
            self.cfg.train_cuts, rank, world, W, self.seed,
            make_sampler=lambda cuts, seed: self._sampler(cuts, seed, 1, 0), keep=DurationFilter(
                self.cfg.min_duration, self.cfg.max_duration),
            dataset=self._train_dataset(0.0), starts=starts, read_timeout=self.cfg.read_timeout,
        )
        return SkipFirst(self._loader(stream, seed=self.seed), offset)

    def val_dataloader(self):
        if not self.cfg.val_cuts:
            return []
        world, rank = self._rank()
        cuts = CutSet.mux(*[open_cuts(s, self.seed) for s in self.cfg.val_cuts]) if len(self.cfg.val_cuts) > 1 \
            else open_cuts(self.cfg.val_cuts[0], self.seed)
        sampler = EpochSampler(self._sampler(cuts, self.seed, world, rank, train=False), endless=False)
        # Validation noise has a seed of its own so that val loss compares across runs of any seed.
        mixer = NoiseMixer(self.cfg.noise, load_noise(self.cfg.noise_cuts, self.sample_rate, 0))
        return self._loader(NestDataset(self.sample_rate, mixer, 0, self.cfg.read_timeout, self.with_targets, pcm16=True),
                            sampler, seed=0)

    # ---- position ------------------------------------------------------------------------------------
    def batch_done(self, batch, window_end: bool) -> None:
        """Called by the training step after each batch; the position moves at the end of a window."""
        self._pending.append((batch.worker, batch.epoch, batch.index))
        if not window_end:
            return
        for worker, epoch, index in self._pending:
            if worker < 0:
                self.epoch, self.batches_done = epoch, index + 1
            else:
                self.last[worker] = (epoch, index)
                self.consumed += 1
        self._pending = []

    def state_dict(self) -> dict[str, Any]:
        state = {"meaning": self.meaning(), "epoch": self.epoch, "batches_done": self.batches_done}
        if self.shar:
            mine = {"last": {str(w): list(p) for w, p in self.last.items()}, "consumed": self.consumed}
            world, _ = self._rank()
            ranks = [None] * world
            if world > 1:  # every rank runs this while the checkpoint is dumped
                torch.distributed.all_gather_object(ranks, mine)
            else:
                ranks = [mine]
            state["ranks"] = ranks
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        before, now = state.get("meaning", {}), self.meaning()
        # A key that the checkpoint's version did not write yet (e.g. contents) is not a change.
        changed = {k: (before[k], v) for k, v in now.items() if k in before and before[k] != v}
        epoch = int(state["epoch"])
        ranks = state.get("ranks")
        if ranks:
            epoch = max([epoch] + [int(p[0]) for r in ranks for p in r["last"].values()])
        if changed:
            log.warning("resuming with other data settings than the checkpoint's (%s): the position of epoch %d "
                        "does not carry over; training continues with epoch %d",
                        "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), epoch, epoch + 1)
            self.epoch, self.batches_done, self.last, self.consumed = epoch + 1, 0, {}, 0
            return
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        if ranks:
            _, rank = self._rank()
            mine = ranks[rank]
            self.last = {int(w): (int(p[0]), int(p[1])) for w, p in mine["last"].items()}
            self.consumed = int(mine["consumed"])
