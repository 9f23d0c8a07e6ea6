"""On-the-fly interference as NeMo's MultiSpeakerNoiseAugmentation draws it, described as Lhotse MixedCuts.

``NoiseMixer`` (a seeded transform) turns some cuts of a batch into MixedCuts: the first track is the
clean utterance, the others the interference pieces, placed where they go and carrying the drawn SNR.
``load_batch_audio`` turns the batch into (clean, noise) waveforms, decoding every source once.

The draws follow NeMo, in samples: with probability ``prob`` an utterance of n samples gets
``int(n * mix_rate)`` samples of interference, split multinomially into ``num_segments`` segments placed in
order without overlap. Noise mode (probability ``noise_ratio``, or a batch of one): the segments are
consecutive stretches of one noise cut, read from a random offset (when it is longer than the utterance)
and repeated when it is shorter. Speech mode: ``num_speakers`` other utterances of the batch, taken in turn
for the segments (then at random), each segment from a random offset of its speaker.

SNR (``snr_definition``, applied by cuts/mixing.py): ``nemo`` scales all pieces by one gain so that the clean utterance's mean energy
over the interference's mean energy across the whole utterance (zeros outside the segments) is the drawn
SNR, as NeMo does; ``segment`` scales each piece on its own against the clean utterance's mean energy, as
lhotse mixes a MixedCut track. With mix_rate 0.5 the segment definition is 3 dB quieter.

Unlike NeMo, utterances left unaugmented get no noise at all (NeMo adds the loaded noise unscaled).
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from lhotse.cut import Cut, MixedCut

from cuts.config import NoiseConfig
from cuts.mixing import mix_in_worker, plan_batch

log = logging.getLogger(__name__)

SNR_DEFINITIONS = ("nemo", "segment")


def multinomial_split(total: int, parts: int, rng: random.Random) -> list[int]:
    """``total`` as the counts of ``total`` uniform draws among ``parts`` (NeMo's Counter of random.choices),
    zero counts left out."""
    counts = np.random.default_rng(rng.getrandbits(64)).multinomial(total, [1.0 / parts] * parts)
    return [int(c) for c in counts if c > 0]


def segment_starts(length: int, mix_len: int, seg_lens: Sequence[int], rng: random.Random) -> list[int]:
    """NeMo's placement: each segment starts at random after the previous one, leaving room for the rest."""
    starts, lo, hi = [], 0, length - mix_len
    for n in seg_lens:
        start = rng.randint(lo, hi - 1) if lo < hi else lo
        starts.append(start)
        lo, hi = start + n, hi + n
    return starts


def stretch(source: Cut, offset: int, num_samples: int) -> list[Cut]:
    """``num_samples`` of ``source`` from sample ``offset``, wrapping to its start (NeMo repeats short audio)."""
    sr, total = source.sampling_rate, source.num_samples
    pieces, left = [], num_samples
    while left > 0:
        take = min(left, total - offset)
        pieces.append(source.truncate(offset=offset / sr, duration=take / sr, preserve_id=True))
        left -= take
        offset = 0
    return pieces


class NoiseMixer:
    """Call with the cuts of one batch (all at one sampling rate) and a seeded RNG; returns the cuts, some
    of them MixedCuts whose first track is the clean utterance and whose other tracks are the interference."""

    def __init__(self, cfg: NoiseConfig, noise_cuts: Optional[Sequence[Cut]]):
        self.cfg = cfg
        # Any sequence: a PackedCuts noise set stays packed (a list would hold every cut as objects in each worker).
        self.noise_cuts = noise_cuts if noise_cuts is not None else []
        for name in ("snr", "speech_snr", "mix_rate", "num_segments", "num_speakers"):
            lo, hi = getattr(cfg, name)
            if lo > hi:
                raise ValueError(f"data.noise.{name}: the low end {lo} is above the high end {hi}")
        if not 0 <= cfg.mix_rate[0] <= cfg.mix_rate[1] <= 1:
            raise ValueError("data.noise.mix_rate must lie within [0, 1]")
        if cfg.num_segments[0] < 1 or cfg.num_speakers[0] < 1:
            raise ValueError("data.noise.num_segments and data.noise.num_speakers must be at least 1")
        if cfg.snr_definition not in SNR_DEFINITIONS:
            raise ValueError(f"data.noise.snr_definition={cfg.snr_definition!r}: use one of {SNR_DEFINITIONS}")

    def __call__(self, cuts: Sequence[Cut], rng: random.Random) -> list[Cut]:
        return [self._augment(i, cuts, rng) for i in range(len(cuts))]

    def _augment(self, i: int, cuts: Sequence[Cut], rng: random.Random) -> Cut:
        cfg, cut, B = self.cfg, cuts[i], len(cuts)
        if rng.random() >= cfg.prob:
            return cut
        lo, hi = cfg.mix_rate
        mix_len = max(1, int(cut.num_samples * (rng.uniform(lo, hi) if lo < hi else lo)))
        num_segments = rng.randint(*cfg.num_segments)
        num_speakers = min(rng.randint(*cfg.num_speakers), B)
        use_noise = rng.random() < cfg.noise_ratio or B == 1
        snr = rng.uniform(*(cfg.snr if use_noise else cfg.speech_snr))
        if use_noise and not self.noise_cuts:
            return cut  # no noise set given: noise mode leaves the utterance clean
        seg_lens = multinomial_split(mix_len, num_segments, rng)
        if use_noise:
            noise = rng.choice(self.noise_cuts)
            # Consecutive stretches of the noise. A noise longer than the utterance is read from a random
            # offset over the utterance's length (mix_len never passes it); a shorter one repeats.
            N = noise.num_samples
            offset = rng.randint(0, N - cut.num_samples) if N > cut.num_samples else 0
            sources, used = [], 0
            for n in seg_lens:
                sources.append(stretch(noise, (offset + used) % N, n))
                used += n
        else:
            others = [j for j in range(B) if j != i]
            speakers = rng.sample(others, k=min(num_speakers, B - 1))
            sources, sid = [], 0
            for n in seg_lens:
                other = cuts[speakers[sid]]
                start = rng.randint(0, other.num_samples - n - 1) if other.num_samples > n else 0
                sources.append(stretch(other, start, n))
                sid += 1
                if sid >= len(speakers):
                    sid = rng.randint(0, len(speakers) - 1)
        sr = cut.sampling_rate
        mixed = cut
        for start, pieces in zip(segment_starts(cut.num_samples, mix_len, seg_lens, rng), sources):
            for piece in pieces:
                mixed = mixed.mix(piece, offset_other_by=start / sr, snr=snr, preserve_id="left")
                start += piece.num_samples
        return mixed


Reader = Callable[[Cut], np.ndarray]


def load_batch_audio(
    cuts: Sequence[Cut], read: Reader, snr_definition: str = "nemo"
) -> list[Union[tuple[np.ndarray, Optional[np.ndarray]], Exception]]:
    """(clean, noise) float32 waveforms of each cut of a batch (noise None where the cut is not a MixedCut), or
    the Exception that its audio raised; the batch's interference as ``cuts.mixing`` places and scales it.

    ``read(cut) -> (num_samples,) float32`` reads one cut (only the cut's span of the file); every read goes
    through it. Each utterance is read once: a speech-in-speech piece is sliced from the batch's own copy of
    its speaker. A failing noise piece costs only that piece (logged); a failing utterance gives its Exception.
    (NestDataset does the same into one batch tensor; this per-cut form is for tests and tools.)
    """
    if snr_definition not in SNR_DEFINITIONS:
        raise ValueError(f"snr_definition={snr_definition!r}: use one of {SNR_DEFINITIONS}")
    firsts = [c.tracks[0].cut if isinstance(c, MixedCut) else c for c in cuts]
    clean: list[Union[np.ndarray, Exception]] = []
    for first in firsts:
        try:
            clean.append(read(first))
        except Exception as e:  # reported by the caller, which drops the cut
            clean.append(e)
    kept = [i for i, a in enumerate(clean) if not isinstance(a, Exception)]
    S = max((len(clean[i]) for i in kept), default=0)
    audio = torch.zeros(len(kept), S)
    for row, i in enumerate(kept):
        audio[row, : len(clean[i])] = torch.from_numpy(clean[i])
    lens = torch.tensor([len(clean[i]) for i in kept], dtype=torch.int64)
    rows = {firsts[i].id: (firsts[i], row) for row, i in enumerate(kept)}
    plan = plan_batch([cuts[i] for i in kept], S, rows, read, None, snr_definition)
    noise = mix_in_worker(audio, lens, plan, torch.empty(len(kept), S))
    out: list = list(clean)
    for row, i in enumerate(kept):
        n = len(clean[i])
        out[i] = (clean[i], noise[row, :n].numpy() if isinstance(cuts[i], MixedCut) else None)
    return out
