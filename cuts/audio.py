"""Reading the utterances of a batch straight into the batch tensor.

A plain cut (one file or in-memory source holding just the cut's channel, no transforms) is decoded by
soundfile into its row of the (B, S) batch tensor: no intermediate array, no padding copy. Anything else
(resampling, channel selection or averaging, URLs, commands, backends other than libsndfile) is read by
lhotse (``load_mono``) and copied into its row. In a dataloader worker the tensor is allocated in shared
memory, as torch's default_collate does, so that handing it to the training process copies nothing.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Optional, Sequence

import numpy as np
import soundfile as sf
import torch
from lhotse.audio.backend import CompositeAudioBackend, LibsndfileBackend, get_current_audio_backend
from lhotse.cut import Cut, MonoCut
from lhotse.utils import compute_num_samples

from cuts.buffers import SharedBuffers

# Subtypes whose float32 samples are exactly int16 / 32768 in libsndfile (its float normalisation).
INT16_EXACT = frozenset({"PCM_16", "PCM_S8", "PCM_U8"})


def lhotse_mono(cut: Cut) -> np.ndarray:
    """(num_samples,) float32 through lhotse; several channels are averaged."""
    audio = cut.load_audio()  # (channels, num_samples)
    if audio.ndim == 2:
        # One channel is a view, not a mean (a mean is a full pass and a copy per utterance).
        audio = audio[0] if audio.shape[0] == 1 else audio.mean(0)
    return audio.astype(np.float32, copy=False)


class _Backend:
    """What lhotse's current audio backend does with plain files, worked out once per backend object."""

    backend, straight, special = None, False, ()

    @classmethod
    def check(cls) -> "type[_Backend]":
        backend = get_current_audio_backend()
        if backend is not cls.backend:
            members = backend.backends if isinstance(backend, CompositeAudioBackend) else [backend]
            # libsndfile reads plain files unless a user chose another backend; SPHERE (sph2pipe) and legacy
            # OPUS (ffmpeg) go to dedicated backends, which lhotse asks first.
            cls.straight = any(isinstance(b, LibsndfileBackend) for b in members)
            cls.special = tuple(b for b in members if not isinstance(b, LibsndfileBackend))
            cls.backend = backend
        return cls


class Direct:
    """Where soundfile finds a plain cut's samples: ``source`` (path or bytes), first frame, frame count."""

    __slots__ = ("source", "start", "frames", "rate")

    def __init__(self, source, start: int, frames: int, rate: int):
        self.source, self.start, self.frames, self.rate = source, start, frames, rate

    @classmethod
    def of(cls, cut: Cut, frames: Optional[int] = None) -> Optional["Direct"]:
        """The cut's samples when soundfile reads them as lhotse would; None when lhotse must (see module doc).
        ``frames``: the cut's ``num_samples`` when known (lhotse computes it anew on every call)."""
        if type(cut) is not MonoCut or cut.recording is None:
            return None
        rec = cut.recording
        if rec.transforms or len(rec.sources) != 1 or rec.has_video:
            return None
        src, backend = rec.sources[0], _Backend.check()
        if src.channels != [cut.channel] or src.type not in ("file", "memory") or not backend.straight:
            return None
        if src.type == "file" and any(b.handles_special_case(src.source) for b in backend.special):
            return None
        start = compute_num_samples(cut.start, rec.sampling_rate) if cut.start else 0
        return cls(src.source, start, cut.num_samples if frames is None else frames, rec.sampling_rate)

    def open(self) -> sf.SoundFile:
        return sf.SoundFile(io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source)

    def read_into(self, out: np.ndarray) -> bool:
        """Decode into ``out[:frames]`` (float32 or int16); False (nothing promised about ``out``) when soundfile
        cannot open the file (a format only lhotse's other backends read, a missing file), when the file does not
        hold the frames or the sampling rate the manifest declares, or is not 16-bit where ``out`` is int16:
        lhotse then reads the cut, with its own tolerance and errors."""
        try:
            f = self.open()
        except (RuntimeError, OSError):  # soundfile.LibsndfileError is a RuntimeError
            if isinstance(self.source, str) and not os.path.exists(self.source):  # one line, not lhotse's six
                raise FileNotFoundError(f"{self.source}: no such file") from None
            return False
        with f:
            if f.channels != 1 or f.samplerate != self.rate or f.frames - self.start < self.frames:
                return False
            if out.dtype == np.int16 and f.subtype not in INT16_EXACT:
                return False
            if self.start:
                f.seek(self.start)
            return f.read(self.frames, dtype=out.dtype.name, out=out[: self.frames]).shape[0] == self.frames


def new_tensor(shape: Sequence[int], dtype: torch.dtype = torch.float32,
               buffers: Optional[SharedBuffers] = None) -> torch.Tensor:
    """An uninitialised tensor; in a dataloader worker, in shared memory (no copy when it is sent), from the
    worker's recycled ``buffers`` when given."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(*shape, dtype=dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    storage = buffers.take(nbytes) if buffers is not None else None
    if storage is None:
        storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


Runner = Callable[[Callable, Cut], object]  # runs fn() for a cut (the read watchdog), re-raising its errors
PCM16_SCALE = 1.0 / 32768  # float32 = int16 * PCM16_SCALE, exactly (libsndfile's normalisation of 16-bit PCM)


class NotPCM16(Exception):
    """A cut whose samples are not 16-bit PCM read as they are (a float32 batch is needed)."""


def read_rows(cuts: Sequence[Cut], run: Runner, pcm16: bool = False, buffers: Optional[SharedBuffers] = None,
              lengths: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, list[Optional[Exception]]]:
    """(B, S) tensor of the cuts' samples, S the longest ``num_samples`` (``lengths``, when known), zeros after
    each cut; per cut, None or the Exception that its audio raised (its row is then zeros).

    With ``pcm16`` the tensor is int16 while every cut is 16-bit PCM read straight (half the bytes to hand
    over; float32 = int16 * PCM16_SCALE exactly, what soundfile would return); the first cut that is not
    turns it into float32."""
    lengths = [c.num_samples for c in cuts] if lengths is None else lengths
    out = new_tensor((len(cuts), max(lengths, default=0)), torch.int16 if pcm16 else torch.float32, buffers)
    errors: list[Optional[Exception]] = []
    for i, (cut, frames) in enumerate(zip(cuts, lengths)):
        try:
            try:
                row = out[i].numpy()
                n = run(lambda: _read_row(cut, row, frames), cut)
            except NotPCM16:
                out = _to_float(out, i, buffers, errors)
                row = out[i].numpy()
                n = run(lambda: _read_row(cut, row, frames), cut)
            row[n:] = 0
            errors.append(None)
        except Exception as e:  # reported by the caller, which drops the cut
            out[i] = 0
            errors.append(e)
    return out, errors


def stalled(errors: Sequence[Optional[Exception]]) -> bool:
    """Whether a read of the batch timed out: its thread may still write into the batch's buffer."""
    return any(isinstance(e, TimeoutError) for e in errors)


def _to_float(pcm: torch.Tensor, rows: int, buffers: Optional[SharedBuffers],
              errors: Sequence[Optional[Exception]] = ()) -> torch.Tensor:
    """float32 copy of a (B, S) int16 batch whose first ``rows`` rows are read (its buffer goes back, unless a
    stalled read may still write into it)."""
    out = new_tensor(pcm.shape, torch.float32, buffers)
    torch.mul(pcm[:rows], PCM16_SCALE, out=out[:rows])
    if buffers is not None:
        buffers.unused(pcm.untyped_storage(), reuse=not stalled(errors))
    return out


def as_float(audio: torch.Tensor) -> torch.Tensor:
    """float32 samples of a batch tensor, whether int16 PCM or float32 already."""
    return audio * PCM16_SCALE if audio.dtype == torch.int16 else audio


def _read_row(cut: Cut, row: np.ndarray, frames: int) -> int:
    direct = Direct.of(cut, frames)
    if direct is not None and direct.read_into(row):
        return direct.frames
    if row.dtype == np.int16:
        raise NotPCM16(cut.id)
    audio = lhotse_mono(cut)
    row[: len(audio)] = audio
    return len(audio)


def load_mono(cut: Cut) -> np.ndarray:
    """(num_samples,) float32, as lhotse reads it (several channels averaged); plain cuts straight through
    soundfile."""
    direct = Direct.of(cut)
    if direct is not None:
        out = np.empty(direct.frames, dtype=np.float32)
        if direct.read_into(out):
            return out
    return lhotse_mono(cut)
