"""CutSet of one batch -> AudioNoiseBatch: waveforms only, loaded and mixed in the dataloader workers."""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from lhotse import CutSet
from lhotse.cut import Cut

from cuts.noise import NoiseMixer, load_batch_audio
from cuts.targets import IGNORE, collate_targets, load_targets

log = logging.getLogger(__name__)


@dataclass
class AudioNoiseBatch:
    """One batch. B utterances, S = longest in samples; waveforms are zero past their length.

    The encoder's input is ``audio + noise``, formed on the accelerator (``noisy_audio``), so only two
    waveform tensors travel to it. A batch whose every cut failed to load holds one second of silence
    and no cut ids: every rank still runs its step (DDP's collectives), with weight 0.
    """

    audio: torch.Tensor  # (B, S) float32 clean speech: the targets come from it
    audio_lens: torch.Tensor  # (B,) int64, also the lengths of noise and noisy audio
    noise: Optional[torch.Tensor] = None  # (B, S) interference as added (scaled, placed); None: none in the batch
    targets: Optional[torch.Tensor] = None  # (B, T', R) int64 precomputed labels (model.targets=kmeans), -1: none
    cut_ids: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cut id, reason) of cuts whose audio did not load
    audio_seconds: float = 0.0  # speech in the batch, padding excluded, counted on the host
    epoch: int = 0  # where the batch came from in its sampler, for exact resume
    index: int = 0
    worker: int = -1  # the stream (dataloader worker) that made it; -1 for the map-style path

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
        """Called by the DataLoader with ``pin_memory=True``: page-locked tensors copy to CUDA asynchronously."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor)})

    def split(self) -> tuple["AudioNoiseBatch", "AudioNoiseBatch"]:
        """The first and second half of the utterances (for retrying a step that ran out of memory)."""
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


def load_mono(cut: Cut) -> np.ndarray:
    """(num_samples,) float32; several channels are averaged."""
    audio = cut.load_audio()  # (channels, num_samples)
    if audio.ndim == 2:
        # One channel is a view, not a mean (a mean is a full pass and a copy per utterance).
        audio = audio[0] if audio.shape[0] == 1 else audio.mean(0)
    return audio.astype(np.float32, copy=False)


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

    def __getstate__(self) -> dict:  # each dataloader worker starts its own thread
        return {"timeout": self.timeout, "_pool": None}

    def __call__(self, cut: Cut) -> np.ndarray:
        if self.timeout <= 0:
            return load_mono(cut)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audio-read")
        future = self._pool.submit(load_mono, cut)
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


class NestDataset(torch.utils.data.Dataset):
    """Map-style dataset whose index is a SamplerItem; returns an AudioNoiseBatch.

    Cuts are resampled to ``sample_rate`` on load (source files are never rewritten). Interference
    is drawn with an RNG seeded from the run's seed and the batch, so a batch is the same whichever
    worker loads it, after a resume too, and validation noise is the same in every run. A cut whose
    audio fails to load (or takes longer than ``read_timeout`` s) is dropped from its batch and listed
    in ``AudioNoiseBatch.failed``.
    """

    def __init__(self, sample_rate: int, mixer: Optional[NoiseMixer], seed: int, read_timeout: float = 0.0,
                 with_targets: bool = False):
        self.sample_rate = sample_rate
        self.mixer = mixer
        self.seed = seed
        self.read = TimedReader(read_timeout)
        self.with_targets = with_targets  # model.targets=kmeans: each cut's labels travel with the batch

    def __getitem__(self, item: SamplerItem) -> AudioNoiseBatch:
        cuts = [at_rate(c, self.sample_rate) for c in item.cuts]
        snr_definition = "nemo"
        if self.mixer is not None:
            cuts = self.mixer(cuts, random.Random(batch_seed(self.seed, item)))
            snr_definition = self.mixer.cfg.snr_definition
        loaded, ids, failed, targets = [], [], [], []
        for cut, result in zip(cuts, load_batch_audio(cuts, self.read, snr_definition)):
            try:
                if isinstance(result, Exception):
                    raise result
                if self.with_targets:
                    targets.append(load_targets(cut))
                loaded.append(result)
                ids.append(cut.id)
            except Exception as e:
                failed.append((cut.id, f"{type(e).__name__}: {e}"))
                log.warning("dropping cut %s from its batch: audio failed to load (%s: %s)", cut.id, type(e).__name__, e)
        batch = collate(loaded, ids, failed, item, self.sample_rate)
        if self.with_targets:
            batch.targets = collate_targets(targets) if targets else torch.full((1, 1, 1), IGNORE)
        return batch


def _pad(arrays: Sequence[np.ndarray], S: int) -> torch.Tensor:
    """(B, S) float32: each array at the start of its row, zeros after (only the tails are written twice)."""
    out = torch.empty(len(arrays), S)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = torch.from_numpy(a)
        out[i, len(a):] = 0.0
    return out


def collate(loaded: Sequence[tuple[np.ndarray, Optional[np.ndarray]]], ids: list[str], failed: list[tuple[str, str]],
            item: SamplerItem, sample_rate: int) -> AudioNoiseBatch:
    """Pad clean and noise waveforms into one batch (one second of silence when nothing loaded); the noise tensor
    is left out when no utterance of the batch has interference."""
    if not loaded:
        loaded = [(np.zeros(sample_rate, dtype=np.float32), None)]
    lens = torch.tensor([len(c) for c, _ in loaded], dtype=torch.int64)
    S = int(lens.max())
    audio = _pad([c for c, _ in loaded], S)
    mixed = any(n is not None for _, n in loaded)
    noise = _pad([n if n is not None else np.zeros(0, np.float32) for _, n in loaded], S) if mixed else None
    return AudioNoiseBatch(
        audio=audio, audio_lens=lens, noise=noise, cut_ids=ids, failed=failed,
        audio_seconds=sum(len(c) for c, _ in loaded) / sample_rate if ids else 0.0,
        epoch=item.epoch, index=item.index, worker=item.worker,
    )
