"""On-the-fly interference: a seeded transform turning some cuts of a batch into Lhotse MixedCuts.

Placement follows NeMo's MultiSpeakerNoiseAugmentation: a share ``mix_rate`` of the utterance is
covered by 1..N non-overlapping segments, filled with noise from the noise CutSet or, with
probability ``1 - noise_ratio``, with another utterance of the same batch (speech-in-speech).
Every piece is mixed at the drawn SNR: mean power of the whole clean utterance over mean power of
the piece, as lhotse defines the SNR of a MixedCut track.

Unlike NeMo, utterances left unaugmented get no noise at all (NeMo adds the loaded noise unscaled).
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import numpy as np
from lhotse.cut import Cut

from cuts.config import NoiseConfig


def split_duration(total: float, parts: int, rng: random.Random) -> list[float]:
    """``total`` seconds cut at ``parts - 1`` uniform points."""
    points = sorted(rng.uniform(0, total) for _ in range(parts - 1))
    edges = [0.0, *points, total]
    return [b - a for a, b in zip(edges, edges[1:]) if b - a > 0]


def pieces_from(source: Cut, duration: float, rng: random.Random) -> list[Cut]:
    """``duration`` seconds of ``source`` from a random offset, wrapping around when it is shorter."""
    pieces, left = [], duration
    start = rng.uniform(0, max(0.0, source.duration - duration)) if source.duration > duration else 0.0
    while left > 1e-4:
        take = min(left, source.duration - start)
        pieces.append(source.truncate(offset=start, duration=take, preserve_id=True))
        left -= take
        start = 0.0
    return pieces


class NoiseMixer:
    """Call with the cuts of one batch and a seeded RNG; returns the cuts, some of them MixedCuts
    whose first track is the clean utterance and whose other tracks are the interference."""

    def __init__(self, cfg: NoiseConfig, noise_cuts: Optional[Sequence[Cut]]):
        self.cfg = cfg
        self.noise_cuts = list(noise_cuts or [])
        for name in ("snr", "speech_snr", "mix_rate", "num_segments"):
            lo, hi = getattr(cfg, name)
            if lo > hi:
                raise ValueError(f"data.noise.{name}: the low end {lo} is above the high end {hi}")
        if not 0 <= cfg.mix_rate[0] <= cfg.mix_rate[1] <= 1:
            raise ValueError("data.noise.mix_rate must lie within [0, 1]")

    @staticmethod
    def _other(i: int, n: int, rng: random.Random) -> int:
        """A uniformly drawn index in range(n) other than ``i``."""
        j = rng.randrange(n - 1)
        return j + (j >= i)

    def __call__(self, cuts: Sequence[Cut], rng: random.Random) -> list[Cut]:
        cfg = self.cfg
        out = []
        for i, cut in enumerate(cuts):
            if rng.random() >= cfg.prob:
                out.append(cut)
                continue
            use_noise = rng.random() < cfg.noise_ratio or len(cuts) == 1
            if use_noise and not self.noise_cuts:
                out.append(cut)  # no noise set given: noise mode leaves the utterance clean
                continue
            snr = rng.uniform(*(cfg.snr if use_noise else cfg.speech_snr))
            mix_dur = cut.duration * rng.uniform(*cfg.mix_rate)
            if mix_dur < 0.01:
                out.append(cut)
                continue
            seg_durs = split_duration(mix_dur, rng.randint(*cfg.num_segments), rng)
            # Gaps between segments: the free time split at uniform points, so segments never overlap.
            free = cut.duration - mix_dur
            gaps = np.diff([0.0, *sorted(rng.uniform(0, free) for _ in seg_durs)]).tolist()
            mixed, t = cut, 0.0
            for gap, dur in zip(gaps, seg_durs):
                t += gap
                source = rng.choice(self.noise_cuts) if use_noise else cuts[self._other(i, len(cuts), rng)]
                offset = t
                for piece in pieces_from(source, dur, rng):
                    mixed = mixed.mix(piece, offset_other_by=offset, snr=snr, preserve_id="left")
                    offset += piece.duration
                t += dur
            out.append(mixed)
        return out
