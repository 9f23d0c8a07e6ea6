"""Lhotse Shar inputs at scale: shards split between ranks and dataloader workers, each worker running its
own bucketing sampler over its shards (as NeMo does for tarred data), with an exact, cheap resume.

Every epoch the shards are shuffled with the run's seed and dealt to the ``world_size x num_workers``
streams; stream ``rank * num_workers + worker`` reads only its shards, so a rank reads about
1/world_size of the bytes and the training process does no sampling at all. A stream's position is the
last batch it gave (epoch, index); to resume, the stream replays its sampler over the cut manifests only
(no audio), finds the first shard that still holds a cut not yet trained on, and opens the audio tar
files from that shard on: finished shards are never read again.

A Shar folder is local, or any URL lhotse's I/O reads (``s3://``, ``https://``, ``pipe:...``) holding a
``shar_index.json`` (written by ``prepare.py shar``) that lists the shard files.
"""
from __future__ import annotations

import json
import logging
import queue
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from lhotse import CutSet
from lhotse.serialization import deserialize_item, open_best
from lhotse.shar.readers.tar import TarIterator

from cuts.io import iter_jsonl, write_text

log = logging.getLogger(__name__)
INDEX = "shar_index.json"


def is_url(source: str) -> bool:
    return "://" in str(source) or str(source).startswith("pipe:")


def write_shar_index(out_dir: Path, fields: dict[str, list[str]]) -> None:
    """``shar_index.json``: the shard files of each field, relative to the folder (for reading from URLs)."""
    names = {k: [Path(p).name for p in v] for k, v in fields.items()}
    write_text(Path(out_dir) / INDEX, json.dumps({"fields": names}, indent=1))


@dataclass
class Shard:
    cuts: str  # path or URL of cuts.NNNNNN.jsonl.gz
    recording: Optional[str]  # path or URL of recording.NNNNNN.tar


def list_shards(source: str) -> list[Shard]:
    """The shards of a Shar folder or URL, in order."""
    if is_url(source):
        base = source.rstrip("/")
        with open_best(f"{base}/{INDEX}", "r") as f:
            fields = json.load(f)["fields"]
        cuts = [f"{base}/{n}" for n in fields["cuts"]]
        recs = [f"{base}/{n}" for n in fields.get("recording", [])]
    else:
        root = Path(source)
        cuts = sorted(str(p) for p in root.glob("cuts.*.jsonl*"))
        recs = sorted(str(p) for p in root.glob("recording.*.tar*"))
    if not cuts:
        raise FileNotFoundError(f"{source}: no cuts.NNNNNN.jsonl.gz shards (is it a Shar folder from prepare.py shar?)")
    if recs and len(recs) != len(cuts):
        raise ValueError(f"{source}: {len(cuts)} cut shards but {len(recs)} recording shards")
    return [Shard(c, recs[i] if recs else None) for i, c in enumerate(cuts)]


def is_shar(source: str) -> bool:
    if is_url(source):
        return not str(source).endswith((".jsonl", ".jsonl.gz", ".json"))
    p = Path(source)
    return p.is_dir() and any(p.glob("cuts.*.jsonl*"))


@dataclass
class ShardProblems:
    """Lines and shards that could not be read, reported with the next batch."""

    items: list = field(default_factory=list)

    def add(self, what: str, reason: str) -> None:
        log.warning("skipping %s: %s", what, reason)
        self.items.append((what, reason))

    def take(self) -> list:
        out, self.items = self.items, []
        return out


def _read_cut_lines(path: str, problems: ShardProblems) -> Iterator:
    def bad(where: str, problem: str) -> None:  # a corrupt line costs that line only
        problems.add(where, f"bad manifest line: {problem}")

    for where, item in iter_jsonl(path, on_error=bad):
        try:
            yield deserialize_item(item)
        except Exception as e:
            bad(where, f"{type(e).__name__}: {e}")


def shard_cuts(shard: Shard, with_audio: bool, problems: ShardProblems) -> Iterator:
    """Cuts of one shard, with their audio attached from the tar file when asked; a corrupt shard ends early."""
    try:
        cuts = _read_cut_lines(shard.cuts, problems)
        if not with_audio or shard.recording is None:
            yield from cuts
            return
        audio = iter(TarIterator(shard.recording))
        for cut in cuts:
            for recording, member in audio:  # tar members of cuts whose line was unreadable are passed over
                if str(member.parent / member.stem) == cut.id:
                    if recording is not None:
                        cut.recording = recording
                    yield cut
                    break
            else:
                problems.add(shard.recording, f"no audio for cut {cut.id} and the rest of the shard")
                return
    except Exception as e:
        problems.add(shard.cuts, f"corrupt shard, rest skipped: {type(e).__name__}: {e}")


class _Timed:
    """Iterates ``source`` in a thread; waiting longer than ``timeout`` seconds for an item raises,
    naming ``what`` and the last item seen (a stalled read of a shard on NFS or an object store)."""

    def __init__(self, source: Iterator, timeout: float, what: str):
        self.q: queue.Queue = queue.Queue(maxsize=64)
        self.timeout, self.what = timeout, what
        self.closed = threading.Event()  # the consumer stopped early: the thread ends instead of waiting forever
        threading.Thread(target=self._run, args=(source,), daemon=True).start()

    def _put(self, entry) -> bool:
        while not self.closed.is_set():
            try:
                self.q.put(entry, timeout=1.0)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, source) -> None:
        try:
            for item in source:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # re-raised in the consumer
            self._put(("error", e))

    def __iter__(self):
        last = None
        try:
            while True:
                try:
                    kind, item = self.q.get(timeout=self.timeout)
                except queue.Empty:
                    raise TimeoutError(f"reading {self.what} stalled for more than {self.timeout:g} s after cut "
                                       f"{getattr(last, 'id', None)} (data.read_timeout)") from None
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                last = item
                yield item
        finally:
            self.closed.set()


class SharStream(torch.utils.data.IterableDataset):
    """Endless batches of one rank; each dataloader worker is one stream over its own shards.

    ``starts[w]`` is the (epoch, index) of the first batch worker ``w`` yields; ``make_sampler(cuts, seed)``
    builds the bucketing sampler, which leaves out cuts failing ``keep``; ``dataset[SamplerItem]`` loads a batch.
    """

    def __init__(self, sources: list[str], rank: int, world_size: int, num_workers: int, seed: int,
                 make_sampler, keep, dataset, starts: dict[int, tuple[int, int]], read_timeout: float = 0.0):
        super().__init__()
        self.shards = [s for source in sources for s in list_shards(source)]
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.seed, self.make_sampler, self.keep, self.dataset = seed, make_sampler, keep, dataset
        self.starts, self.read_timeout = starts, read_timeout
        self.opened: list[str] = []  # audio tar files this stream opened (for tests and benchmarks)

    def shards_of(self, epoch: int, worker: int) -> list[Shard]:
        order = list(range(len(self.shards)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        slot, slots = self.rank * self.num_workers + worker, self.world_size * self.num_workers
        return [self.shards[i] for i in order[slot::slots]]

    def _cuts(self, shards: list[Shard], first_with_audio: int, problems: ShardProblems) -> CutSet:
        def gen():
            for i, shard in enumerate(shards):
                with_audio = i >= first_with_audio
                if with_audio and shard.recording:
                    self.opened.append(shard.recording)
                for cut in shard_cuts(shard, with_audio, problems):
                    cut.shard_index = i
                    yield cut

        what = f"the shards of stream {self.rank}/{self._worker()}"
        return CutSet(LazyCuts(lambda: _Timed(gen(), self.read_timeout, what) if self.read_timeout > 0 else gen()))

    def _sampler_seed(self, epoch: int, worker: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7_919 + worker * 104_729) % 2**31

    def first_unfinished_shard(self, shards: list[Shard], epoch: int, worker: int, done: int) -> int:
        """Index of the first shard holding a cut not in the first ``done`` batches (cut manifests only)."""
        if done == 0:
            return 0
        sampler = self.make_sampler(self._cuts(shards, len(shards), ShardProblems()), self._sampler_seed(epoch, worker))
        consumed: set[str] = set()
        for index, batch in enumerate(sampler):
            consumed.update(c.id for c in batch)
            if index + 1 >= done:
                break
        for i, shard in enumerate(shards):
            for cut in shard_cuts(shard, False, ShardProblems()):
                if cut.id not in consumed and self.keep(cut):
                    return i
        return len(shards)

    @staticmethod
    def _worker() -> int:
        info = torch.utils.data.get_worker_info()
        return info.id if info is not None else 0

    def __iter__(self):
        worker = self._worker()
        epoch, start = self.starts.get(worker, (0, 0))
        problems = ShardProblems()
        while True:
            shards = self.shards_of(epoch, worker)
            first = self.first_unfinished_shard(shards, epoch, worker, start)
            if first:
                log.info("worker %d/%d resumes epoch %d at batch %d: %d finished shards are not read", self.rank,
                         worker, epoch, start, first)
            sampler = self.make_sampler(self._cuts(shards, first, problems), self._sampler_seed(epoch, worker))
            from cuts.dataset import SamplerItem

            for index, cuts in enumerate(sampler):
                if index < start:
                    continue
                batch = self.dataset[SamplerItem(cuts=cuts, epoch=epoch, index=index, worker=worker)]
                batch.failed.extend(problems.take())
                yield batch
            epoch, start = epoch + 1, 0


class LazyCuts:
    """A lazy iterable for CutSet, made anew by ``factory`` on each pass."""

    def __init__(self, factory):
        self.factory = factory

    def __iter__(self):
        return iter(self.factory())
