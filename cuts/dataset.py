"""CutSet of one batch -> AudioNoiseBatch: waveforms only, loaded and mixed in the dataloader workers."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from lhotse import CutSet
from lhotse.cut import Cut, MixedCut

from cuts.noise import NoiseMixer
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
    audio = cut.load_audio()
    return (audio.mean(0) if audio.ndim == 2 else audio).astype(np.float32)


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


def mean_power(x: np.ndarray) -> float:
    return float(np.mean(x.astype(np.float64) ** 2))


def snr_gain(reference_power: float, added: np.ndarray, snr: Optional[float]) -> float:
    """Gain making ``reference_power`` over the mean power of ``added`` equal ``snr`` dB; 1 when either is silent."""
    if snr is None:
        return 1.0
    add = mean_power(added)
    if reference_power <= 0 or add <= 0:
        return 1.0
    return float(np.sqrt(reference_power * 10 ** (-snr / 10) / add))


def load_clean_and_noise(cut: Cut, read=load_mono) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Clean audio and the interference placed and scaled as the MixedCut describes, unmixed (None: none)."""
    if not isinstance(cut, MixedCut):
        return read(cut), None
    first, *rest = cut.tracks
    clean = read(first.cut)
    noise = np.zeros_like(clean)
    sr = first.cut.sampling_rate
    reference = mean_power(clean)  # once per utterance, whatever the number of pieces
    for track in rest:
        try:
            piece = read(track.cut)
        except Exception as e:  # a bad noise file must not cost the utterance
            log.warning("skipping interference %s of cut %s: %s", track.cut.id, cut.id, e)
            continue
        start = int(round(track.offset * sr))
        piece = piece[: max(0, len(noise) - start)]
        noise[start : start + len(piece)] += snr_gain(reference, piece, track.snr) * piece
    return clean, noise


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
        if self.mixer is not None:
            cuts = self.mixer(cuts, random.Random(batch_seed(self.seed, item)))
        loaded, ids, failed, targets = [], [], [], []
        for cut in cuts:
            try:
                audio = load_clean_and_noise(cut, self.read)
                if self.with_targets:
                    targets.append(load_targets(cut))
                loaded.append(audio)
                ids.append(cut.id)
            except Exception as e:
                failed.append((cut.id, f"{type(e).__name__}: {e}"))
                log.warning("dropping cut %s from its batch: audio failed to load (%s: %s)", cut.id, type(e).__name__, e)
        batch = collate(loaded, ids, failed, item, self.sample_rate)
        if self.with_targets:
            batch.targets = collate_targets(targets) if targets else torch.full((1, 1, 1), IGNORE)
        return batch


def collate(loaded: Sequence[tuple[np.ndarray, Optional[np.ndarray]]], ids: list[str], failed: list[tuple[str, str]],
            item: SamplerItem, sample_rate: int) -> AudioNoiseBatch:
    """Pad clean and noise waveforms into one batch (one second of silence when nothing loaded)."""
    if not loaded:
        loaded = [(np.zeros(sample_rate, dtype=np.float32), None)]
    lens = torch.tensor([len(c) for c, _ in loaded], dtype=torch.int64)
    S = int(lens.max())
    audio = torch.zeros(len(loaded), S)
    noise = torch.zeros(len(loaded), S) if any(n is not None for _, n in loaded) else None
    for i, (c, n) in enumerate(loaded):
        audio[i, : len(c)] = torch.from_numpy(c)
        if n is not None:
            noise[i, : len(n)] = torch.from_numpy(n)
    return AudioNoiseBatch(
        audio=audio, audio_lens=lens, noise=noise, cut_ids=ids, failed=failed,
        audio_seconds=sum(len(c) for c, _ in loaded) / sample_rate if ids else 0.0,
        epoch=item.epoch, index=item.index, worker=item.worker,
    )
