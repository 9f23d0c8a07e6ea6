"""The interference of a batch as a plan of pieces, applied in the worker or on the device, and the noise bank.

``NoiseMixer`` (cuts/noise.py) describes each augmented utterance as a MixedCut. ``plan_batch`` turns the
MixedCuts of a batch into a ``MixPlan``: for every piece of interference, the row it goes into, where, how
long, and where its samples are: a row of the batch's own clean audio (speech-in-speech), the ``packed``
tensor of pieces the worker decoded, or the device-resident ``NoiseBank``. ``mix_in_worker`` (slices, on the
CPU) and ``mix_on_device`` (one gather and one index_add for the whole batch, no host sync) apply the same
law to it, NeMo's (see cuts/noise.py):

- ``nemo``: the pieces are placed unscaled, then the row is scaled by one gain so that the clean row's energy
  over the interference's energy (both over the utterance) is the drawn SNR; no gain (zero noise) when the
  interference is silent.
- ``segment``: each piece is scaled on its own so that the clean row's mean energy over the piece's mean
  energy is the drawn SNR (left unscaled when either is silent).

A piece without an SNR (``nan``; MixedCuts made elsewhere) is added unscaled.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from lhotse.cut import Cut, MixedCut

from cuts.console import error_line
from cuts.audio import as_float

log = logging.getLogger(__name__)

ROW, PACKED, BANK = 0, 1, 2  # where a piece's samples are


@dataclass
class MixPlan:
    """The interference of a batch of B utterances (S samples at most) as P pieces, ordered by source.

    One int64 tensor holds it all (every tensor a worker sends costs a shared-memory segment and a file
    descriptor): B row SNRs, then P rows of (row, first sample in the row, length, source (ROW, PACKED or
    BANK), position in the source, SNR); an SNR is a float32 in dB stored by its bits (nan: unscaled). The
    position is, for ROW, ``row * S + start`` in the flattened clean audio; for PACKED and BANK, the start
    in that tensor.
    """

    table: torch.Tensor  # (B + 6 P,) int64, as above
    rows: int  # B
    packed: Optional[torch.Tensor]  # (N,) float32 samples of the PACKED pieces, back to back; None: none
    counts: tuple[int, int, int]  # samples of the ROW, PACKED and BANK pieces (host ints: sizes without syncs)
    definition: str = "nemo"

    @property
    def pieces(self) -> torch.Tensor:
        """(P, 5) int64: row, first sample, length, source, position."""
        return self.table[self.rows :].view(-1, 6)[:, :5]

    @property
    def piece_snr(self) -> torch.Tensor:
        """(P,) float32 dB."""
        return _from_bits(self.table[self.rows :].view(-1, 6)[:, 5])

    @property
    def row_snr(self) -> torch.Tensor:
        """(B,) float32 dB of each row's last piece (the nemo gain); nan: none."""
        return _from_bits(self.table[: self.rows])

    def pin_memory(self) -> "MixPlan":
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


Reader = Callable[[Cut], np.ndarray]


def _bits(values: list[float]) -> list[int]:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32).tolist()


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


class NoiseBank:
    """A seeded sample of the noise set, decoded once per rank into one float32 tensor that stays on the
    device; workers draw pieces from its cuts and send only where they lie (``MixPlan``), so they decode
    clean audio only. An hour at 16 kHz is 230 MB."""

    def __init__(self, cuts: Sequence[Cut]):
        self.cuts = list(cuts)
        self.where: dict[str, tuple[int, float]] = {}  # noise cut id -> (first sample in the bank, its start)
        total = 0
        for c in self.cuts:
            self.where[c.id] = (total, c.start)
            total += c.num_samples
        self.num_samples = total

    @classmethod
    def sample(cls, noise_cuts: Sequence[Cut], seconds: float, seed: int) -> "NoiseBank":
        """Noise cuts in a seeded random order until ``seconds`` (the last one shortened to fit); each id once."""
        order = list(range(len(noise_cuts)))
        random.Random(f"{seed}:noise-bank").shuffle(order)
        chosen, seen, left = [], set(), seconds
        for i in order:
            if left < 0.1:
                break
            cut = noise_cuts[i]
            if cut.id in seen:
                continue
            seen.add(cut.id)
            if cut.duration > left:
                cut = cut.truncate(duration=left, preserve_id=True)
            chosen.append(cut)
            left -= cut.duration
        return cls(chosen)

    def load(self, read: Reader) -> torch.Tensor:
        """(num_samples,) float32: every cut decoded, back to back (a cut that fails to load stays silent). The
        training process decodes it once per rank, onto the device (nest.training.data); workers get the cuts."""
        out = torch.zeros(self.num_samples)
        for c in self.cuts:
            start = self.where[c.id][0]
            try:
                audio = read(c)[: c.num_samples]
            except Exception as e:
                log.warning("noise bank: %s left silent: %s", c.id, error_line(e))
                continue
            out[start : start + len(audio)] = torch.from_numpy(audio)
        return out


def plan_batch(cuts: Sequence[Cut], S: int, rows: dict[str, tuple[Cut, int]], read: Reader,
               bank: Optional[NoiseBank], definition: str = "nemo") -> MixPlan:
    """The plan of ``cuts`` (one per row, MixedCut where augmented). ``rows`` maps the id of each decoded
    utterance to (its cut, its row): a speech piece is taken from there. Noise pieces come from ``bank``
    when it holds them, else they are read (a piece that fails to load is left out, logged)."""
    parts: list[list] = [[], [], []]
    packed: list[np.ndarray] = []
    packed_len = 0
    row_snr = [float("nan")] * len(cuts)
    for r, cut in enumerate(cuts):
        if not isinstance(cut, MixedCut):
            continue
        n = cut.tracks[0].cut.num_samples
        sr = cut.tracks[0].cut.sampling_rate
        for track in cut.tracks[1:]:
            piece, dest = track.cut, int(round(track.offset * sr))
            length = min(piece.num_samples, n - dest)
            if length <= 0:
                continue
            snr = float("nan") if track.snr is None else float(track.snr)
            hit, held = rows.get(piece.id), bank.where.get(piece.id) if bank is not None else None
            if hit is not None and hit[0].recording_id == piece.recording_id:
                whole, src_row = hit
                entry = (r, dest, length, ROW, src_row * S + round((piece.start - whole.start) * sr))
            elif held is not None:
                entry = (r, dest, length, BANK, held[0] + round((piece.start - held[1]) * sr))
            else:
                try:
                    audio = read(piece)[:length]
                except Exception as e:  # a bad noise file must not cost the utterance
                    log.warning("skipping interference %s of cut %s: %s", piece.id, cut.id, error_line(e))
                    continue
                length = len(audio)
                entry = (r, dest, length, PACKED, packed_len)
                packed.append(audio)
                packed_len += length
            parts[entry[3]].append((entry, snr))
            row_snr[r] = snr
    ordered = parts[ROW] + parts[PACKED] + parts[BANK]
    snr_bits = _bits([s for _, s in ordered])
    table = _bits(row_snr) + [v for (e, _), b in zip(ordered, snr_bits) for v in (*e, b)]
    counts = tuple(sum(e[2] for e, _ in part) for part in parts)
    return MixPlan(table=torch.tensor(table, dtype=torch.int64), rows=len(cuts),
                   packed=torch.from_numpy(np.concatenate(packed)) if packed else None, counts=counts,
                   definition=definition)


def _segment_scale(clean_energy: float, n: int, snr: float, added: float, length: int) -> float:
    if np.isnan(snr) or clean_energy <= 0 or added <= 0:
        return 1.0
    return float(np.sqrt(clean_energy / n * 10 ** (-snr / 10) / (added / length)))


def mix_in_worker(audio: torch.Tensor, audio_lens: torch.Tensor, plan: MixPlan, out: torch.Tensor) -> torch.Tensor:
    """``out`` (B, S) float32 = the plan's interference, by slices (the CPU path). ``audio`` (B, S) clean,
    float32 or int16 PCM."""
    out.zero_()
    if plan.pieces.shape[0] == 0:
        return out
    flat = audio.reshape(-1)
    energy = {}
    for (r, dest, length, kind, src), snr in zip(plan.pieces.tolist(), plan.piece_snr.tolist()):
        if kind == BANK:
            raise ValueError("a plan with noise bank pieces is applied on the device (mix_on_device)")
        values = as_float(flat[src : src + length]) if kind == ROW else plan.packed[src : src + length]
        if r not in energy:
            row = as_float(audio[r])
            energy[r] = float(torch.dot(row, row))
        if plan.definition == "segment":
            scale = _segment_scale(energy[r], int(audio_lens[r]), snr, float(torch.dot(values, values)), length)
            values = values * scale
        out[r, dest : dest + length] += values
    if plan.definition == "nemo":
        for r, snr in zip(energy, plan.row_snr[list(energy)].tolist()):
            if np.isnan(snr):
                continue
            added = float(torch.dot(out[r], out[r]))
            # NeMo: both mean energies over the utterance's length, and no noise when either is silent.
            out[r] *= float(np.sqrt(energy[r] / (10 ** (snr / 10) * added))) if added > 0 else 0.0
    return out


def mix_on_device(audio: torch.Tensor, audio_lens: torch.Tensor, plan: MixPlan,
                  bank: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, S) float32 interference of the plan, on ``audio``'s device (float32 clean), in a fixed number of
    kernels and no host sync (sizes come from ``plan.counts``). Equal to ``mix_in_worker`` up to float32
    summation order."""
    B, S = audio.shape
    noise = torch.zeros(B * S, device=audio.device)
    P, total = plan.pieces.shape[0], sum(plan.counts)
    if P == 0:
        return noise.view(B, S)
    rows, dest, length, _, src = plan.pieces.unbind(1)  # views of the plan's one tensor
    piece = torch.repeat_interleave(torch.arange(P, device=audio.device), length, output_size=total)
    within = torch.arange(total, device=audio.device) - (torch.cumsum(length, 0) - length)[piece]
    at = src[piece] + within
    a, b, _ = plan.counts
    sources = [audio.reshape(-1)[at[:a]]]
    if b:
        sources.append(plan.packed[at[a : a + b]])
    if plan.counts[BANK]:
        if bank is None:
            raise ValueError("the plan draws on a noise bank, and none was given")
        sources.append(bank[at[a + b :]])
    values = torch.cat(sources)
    clean_energy = (audio * audio).sum(1)  # (B,)
    if plan.definition == "segment":
        added = torch.zeros(P, device=audio.device).index_add_(0, piece, values * values)
        snr, ce = plan.piece_snr, clean_energy[rows]
        scale = torch.sqrt(ce / audio_lens[rows] * 10 ** (-snr / 10) / (added / length))
        scale = torch.where(torch.isnan(snr) | (ce <= 0) | (added <= 0), 1.0, scale)
        values = values * scale[piece]
    noise.index_add_(0, rows[piece] * S + dest[piece] + within, values)
    noise = noise.view(B, S)
    if plan.definition == "nemo":
        added = (noise * noise).sum(1)
        snr = plan.row_snr
        gain = torch.sqrt(clean_energy / (10 ** (snr / 10) * added))
        gain = torch.where(added > 0, gain, 0.0)
        gain = torch.where(torch.isnan(snr), 1.0, gain)
        noise = noise * gain[:, None]
    return noise
