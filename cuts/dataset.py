"""CutSet of one batch -> AudioNoiseBatch: waveforms only, loaded and mixed in the dataloader workers."""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import numpy as np
import torch
from lhotse import CutSet
from lhotse.cut import Cut, MixedCut

from cuts.audio import as_float, load_mono, new_tensor, read_rows, stalled
from cuts.buffers import SharedBuffers, give_back
from cuts.console import error_line
from cuts.mixing import MixPlan, NoiseBank, mix_in_worker, mix_on_device, plan_batch
from cuts.noise import NoiseMixer, load_batch_audio
from cuts.targets import IGNORE, collate_targets, load_targets

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class AudioNoiseBatch:
    """One batch. B utterances, S = longest in samples; waveforms are zero past their length.

    The encoder's input is ``audio + noise``, formed on the accelerator (``noisy_audio``). The interference
    travels as ``noise`` (mixed in the worker) or as ``mix``, a plan of pieces (``data.mix_on_device``) that
    ``prepared`` turns into ``noise`` where the batch is. A batch whose every cut failed to load holds one
    second of silence and no cut ids: every rank still runs its step (DDP's collectives), with weight 0.
    """

    audio: torch.Tensor  # (B, S) float32 clean speech: the targets come from it; int16 PCM from a loader that
    #   sends 16-bit sources as they are (float32 = int16 / 32768): ``prepared`` turns it into float32
    audio_lens: torch.Tensor  # (B,) int64, also the lengths of noise and noisy audio
    noise: Optional[torch.Tensor] = None  # (B, S) interference as added (scaled, placed); None: none in the batch
    targets: Optional[torch.Tensor] = None  # (B, T', R) int64 precomputed labels (model.targets=kmeans), -1: none
    cut_ids: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cut id, reason) of cuts whose audio did not load
    audio_seconds: float = 0.0  # speech in the batch, padding excluded, counted on the host
    epoch: int = 0  # where the batch came from in its sampler, for exact resume
    index: int = 0
    worker: int = -1  # the stream (dataloader worker) that made it; -1 for the map-style path
    mix: Optional[MixPlan] = None  # interference still to be formed (data.mix_on_device), else None
    buffers: tuple = ()  # the worker's shared buffers holding the tensors, handed back once copied (cuts/buffers.py)

    def __len__(self) -> int:
        return len(self.cut_ids)

    @property
    def num_failed(self) -> int:
        return len(self.failed)

    @property
    def noisy_audio(self) -> torch.Tensor:
        """(B, S) the encoder's input before masking."""
        return self.audio if self.noise is None else self.audio + self.noise

    def pin_memory(self) -> "AudioNoiseBatch":
        """Called by the DataLoader with ``pin_memory=True``: page-locked tensors copy to CUDA asynchronously.
        The worker's shared buffers go back to it: this batch is not read again."""
        pinned = dataclasses.replace(
            self, buffers=(), **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                                 if isinstance(getattr(self, f.name), (torch.Tensor, MixPlan))})
        give_back(self.buffers)
        return pinned

    def prepared(self, bank: Optional[torch.Tensor] = None) -> "AudioNoiseBatch":
        """The batch as the model takes it, formed where its tensors are (on the accelerator after the
        transfer): float32 audio, and the planned interference placed and scaled (``bank``: the noise bank's
        samples on that device, when the plan draws on it). Itself when there is nothing to do."""
        if self.mix is None and self.audio.dtype == torch.float32:
            return self
        audio = as_float(self.audio)
        noise = self.noise if self.mix is None else mix_on_device(audio, self.audio_lens, self.mix, bank)
        return dataclasses.replace(self, audio=audio, noise=noise, mix=None)

    def split(self) -> tuple["AudioNoiseBatch", "AudioNoiseBatch"]:
        """The first and second half of the utterances (for retrying a step that ran out of memory); the
        batch must be ``prepared``."""
        if self.mix is not None:
            raise ValueError("split a prepared batch: its mixing plan indexes the whole batch")
        half = (self.audio.shape[0] + 1) // 2
        parts = []
        for sl in (slice(0, half), slice(half, None)):
            lens = self.audio_lens[sl]
            S = int(lens.max()) if len(lens) else 0  # lengths live on the host until the batch is moved
            parts.append(dataclasses.replace(
                self, audio=self.audio[sl, :S], audio_lens=lens,
                noise=None if self.noise is None else self.noise[sl, :S],
                targets=None if self.targets is None else self.targets[sl], cut_ids=self.cut_ids[sl],
            ))
        return parts[0], parts[1]


@dataclass
class SamplerItem:
    """What the sampler hands the dataset: the cuts of one batch and their position."""

    cuts: CutSet
    epoch: int = 0
    index: int = 0
    worker: int = -1


def batch_seed(seed: int, item: SamplerItem) -> int:
    """A seed that depends only on the run's seed and the batch, not on the worker that loads it."""
    first = next(iter(item.cuts)).id if len(item.cuts) else ""
    key = f"{seed}:{item.worker}:{item.epoch}:{item.index}:{first}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def at_rate(cut: Cut, sample_rate: int) -> Cut:
    """``cut`` resampled (lazily, on load) to ``sample_rate`` when it is at another rate."""
    return cut if cut.sampling_rate == sample_rate else cut.resample(sample_rate)


def keep_freed_memory() -> None:
    """Let this process reuse the memory of its past batches instead of handing it back to the system.

    glibc returns every freed block over 128 KiB to the system, so each new batch (decoded audio, the padded
    tensors) lands in fresh pages and pays a page fault per 4 KiB on first touch: a third of a dataloader
    worker's time on this project's data path. With the thresholds raised, freed blocks stay in the heap
    and the worker's memory stays at its peak, a few batches' worth. Called in each dataloader worker.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocate from the heap up to 1 GiB
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


class TimedReader:
    """``load_mono`` that gives up after ``timeout`` seconds with an error naming the cut.

    A read stalled on NFS or an object store cannot be interrupted; it is left behind in its thread
    (a fresh thread serves the next reads) and the cut counts as failed, instead of hanging the worker
    and, through DDP, every rank. ``timeout <= 0`` reads directly.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # each dataloader worker starts its own thread
        return {"timeout": self.timeout, "_pool": None, "_pid": None}

    def __call__(self, cut: Cut) -> np.ndarray:
        return self.run(lambda: load_mono(cut), cut)

    def run(self, fn: Callable[[], T], cut: Cut) -> T:
        """``fn()``, the read of ``cut``, under the watchdog."""
        if self.timeout <= 0:
            return fn()
        if self._pool is None or self._pid != os.getpid():  # a forked worker inherits no thread of its parent's
            self._pool, self._pid = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audio-read"), os.getpid()
        future = self._pool.submit(fn)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise TimeoutError(f"reading the audio of cut {cut.id} took more than {self.timeout:g} s "
                               f"(data.read_timeout): stalled storage?") from None


def load_clean_and_noise(cut: Cut, snr_definition: str = "nemo") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Clean audio and the interference placed and scaled as the MixedCut describes, unmixed (one cut;
    a batch is faster through cuts.noise.load_batch_audio, which decodes each utterance once)."""
    result = load_batch_audio([cut], load_mono, snr_definition)[0]
    if isinstance(result, Exception):
        raise result
    return result


def _first(cut: Cut) -> Cut:
    return cut.tracks[0].cut if isinstance(cut, MixedCut) else cut


class NestDataset(torch.utils.data.Dataset):
    """Map-style dataset whose index is a SamplerItem; returns an AudioNoiseBatch.

    Cuts are resampled to ``sample_rate`` on load (source files are never rewritten). Interference
    is drawn with an RNG seeded from the run's seed and the batch, so a batch is the same whichever
    worker loads it, after a resume too, and validation noise is the same in every run. A cut whose
    audio fails to load (or takes longer than ``read_timeout`` s) is dropped from its batch and listed
    in ``AudioNoiseBatch.failed``. With ``mix_on_device`` the interference travels as a plan (``mix``),
    its noise pieces drawn from ``bank`` when given (the mixer then draws from the bank's cuts). With
    ``pcm16`` 16-bit sources travel as int16 (half the bytes); a worker that meets another kind of source
    sends float32 from then on. Batches of both options are ``prepared`` where the model runs. With
    ``buffers`` a worker reuses the shared memory of the batches the training process has pinned.
    """

    def __init__(self, sample_rate: int, mixer: Optional[NoiseMixer], seed: int, read_timeout: float = 0.0,
                 with_targets: bool = False, mix_on_device: bool = False, bank: Optional[NoiseBank] = None,
                 pcm16: bool = False, buffers: Optional[SharedBuffers] = None):
        if bank is not None and not mix_on_device:
            raise ValueError("a noise bank lives on the device: it needs mix_on_device")
        self.pcm16, self.buffers = pcm16, buffers
        self.sample_rate = sample_rate
        self.mixer = mixer
        self.seed = seed
        self.read = TimedReader(read_timeout)
        self.with_targets = with_targets  # model.targets=kmeans: each cut's labels travel with the batch
        self.mix_on_device, self.bank = mix_on_device, bank

    def __getitem__(self, item: SamplerItem) -> AudioNoiseBatch:
        cuts = [at_rate(c, self.sample_rate) for c in item.cuts]
        definition = "nemo"
        if self.mixer is not None:
            cuts = self.mixer(cuts, random.Random(batch_seed(self.seed, item)))
            definition = self.mixer.cfg.snr_definition
        firsts = [_first(c) for c in cuts]
        lengths = [c.num_samples for c in firsts]  # lhotse computes num_samples anew on every call
        audio, errors = read_rows(firsts, self.read.run, self.pcm16, self.buffers, lengths)
        self.pcm16 = audio.dtype == torch.int16 and self.pcm16  # float32 for good after a source that is not
        keep, failed, targets = [], [], []
        for i, (cut, error) in enumerate(zip(cuts, errors)):
            try:
                if error is not None:
                    raise error
                if self.with_targets:
                    targets.append(load_targets(cut))
                keep.append(i)
            except Exception as e:
                failed.append((cut.id, error_line(e)))
                log.warning("dropping cut %s from its batch: audio failed to load (%s)", *failed[-1])
        reuse = not stalled(errors)  # a timed-out read may still write into ``audio``: its buffer is not reused
        if not keep:  # one second of silence: every rank still takes its step
            if self.buffers is not None:
                self.buffers.unused(audio.untyped_storage(), reuse)
            audio, lens = torch.zeros(1, self.sample_rate), torch.tensor([self.sample_rate])
        else:
            lens = torch.tensor([lengths[i] for i in keep], dtype=torch.int64)
            if len(keep) < len(cuts):  # rows of failed cuts (maybe still written by a stalled read) are left behind
                S = int(lens.max())
                kept = new_tensor((len(keep), S), audio.dtype, self.buffers)
                torch.index_select(audio[:, :S], 0, torch.tensor(keep), out=kept)
                if self.buffers is not None:
                    self.buffers.unused(audio.untyped_storage(), reuse)
                audio = kept
        batch = AudioNoiseBatch(
            audio=audio, audio_lens=lens, cut_ids=[cuts[i].id for i in keep], failed=failed,
            audio_seconds=float(lens.sum()) / self.sample_rate if keep else 0.0,
            epoch=item.epoch, index=item.index, worker=item.worker,
        )
        mixed = [cuts[i] for i in keep]
        if any(isinstance(c, MixedCut) for c in mixed):
            rows = {firsts[i].id: (firsts[i], row) for row, i in enumerate(keep)}
            plan = plan_batch(mixed, audio.shape[1], rows, self.read, self.bank, definition)
            if self.mix_on_device:
                batch.mix = plan
            else:
                batch.noise = mix_in_worker(audio, lens, plan, new_tensor(audio.shape, buffers=self.buffers))
        if self.with_targets:
            batch.targets = collate_targets(targets) if targets else torch.full((1, 1, 1), IGNORE)
        if self.buffers is not None:
            batch.buffers = self.buffers.sent()
        return batch
