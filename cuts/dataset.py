"""CutSet of one batch -> AudioNoiseBatch: waveforms only, loaded and mixed in the dataloader workers."""
from __future__ import annotations

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

log = logging.getLogger(__name__)


@dataclass
class AudioNoiseBatch:
    """One batch. S = longest utterance in samples; every waveform is zero past its length."""

    audio: torch.Tensor  # (B, S) clean speech: the quantizer's targets come from it
    audio_lens: torch.Tensor  # (B,) int64
    noise: torch.Tensor  # (B, S) interference as added (scaled, placed); zero where none
    noise_lens: torch.Tensor  # (B,)
    noisy_audio: torch.Tensor  # (B, S) audio + noise: the encoder's input
    noisy_audio_lens: torch.Tensor  # (B,)
    cut_ids: list[str] = field(default_factory=list)
    num_failed: int = 0  # cuts dropped from this batch because their audio did not load
    epoch: int = 0  # where the batch came from in the sampler, for exact resume
    index: int = 0

    def __len__(self) -> int:
        return len(self.cut_ids)


@dataclass
class SamplerItem:
    """What the sampler hands the dataset: the cuts of one batch and their position."""

    cuts: CutSet
    epoch: int = 0
    index: int = 0


def batch_seed(seed: int, item: SamplerItem) -> int:
    """A seed that depends only on the run's seed and the batch, not on the worker that loads it."""
    first = next(iter(item.cuts)).id if len(item.cuts) else ""
    key = f"{seed}:{item.epoch}:{item.index}:{first}".encode()
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


def load_clean_and_noise(cut: Cut, snr_definition: str = "nemo") -> tuple[np.ndarray, np.ndarray]:
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
    worker loads it, after a resume too, and validation noise is the same in every run.
    """

    def __init__(self, sample_rate: int, mixer: Optional[NoiseMixer], seed: int):
        self.sample_rate = sample_rate
        self.mixer = mixer
        self.seed = seed

    def __getitem__(self, item: SamplerItem) -> AudioNoiseBatch:
        cuts = [at_rate(c, self.sample_rate) for c in item.cuts]
        if self.mixer is not None:
            cuts = self.mixer(cuts, random.Random(batch_seed(self.seed, item)))
        loaded, ids, failed = [], [], 0
        for cut in cuts:
            try:
                loaded.append(load_clean_and_noise(cut))
                ids.append(cut.id)
            except Exception as e:
                failed += 1
                log.warning("dropping cut %s from its batch: audio failed to load (%s: %s)", cut.id, type(e).__name__, e)
        return collate(loaded, ids, failed, item)


def collate(loaded: Sequence[tuple[np.ndarray, np.ndarray]], ids: list[str], failed: int, item: SamplerItem) -> AudioNoiseBatch:
    """Pad clean and noise waveforms into one batch."""
    lens = torch.tensor([len(c) for c, _ in loaded], dtype=torch.int64)
    S = int(lens.max()) if len(lens) else 0
    audio = torch.zeros(len(loaded), S)
    noise = torch.zeros(len(loaded), S)
    for i, (c, n) in enumerate(loaded):
        audio[i, : len(c)] = torch.from_numpy(c)
        noise[i, : len(n)] = torch.from_numpy(n)
    return AudioNoiseBatch(
        audio=audio, audio_lens=lens, noise=noise, noise_lens=lens.clone(), noisy_audio=audio + noise,
        noisy_audio_lens=lens.clone(), cut_ids=ids, num_failed=failed, epoch=item.epoch, index=item.index,
    )
