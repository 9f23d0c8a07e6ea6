"""Audio folders -> Lhotse CutSets, with every left-out file reported and a summary.

Each output folder gets ``cuts.jsonl.gz`` (written lazily, cut by cut), ``rejected.jsonl`` (one
line per input left out: path and reason) and ``summary.json``.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
from lhotse import CutSet, MonoCut, MultiCut, Recording
from tqdm import tqdm

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = {".wav", ".flac", ".sph", ".mp3", ".opus", ".ogg", ".m4a", ".aac", ".aif", ".aiff", ".wma"}
SILENCE_PEAK = 1e-5  # a file whose peak stays below this (about -100 dBFS) has no usable energy
DURATION_TOLERANCE = 0.01  # seconds between the header's duration and the decoded one


@dataclass
class Rejection:
    path: str
    reason: str


def find_audio(src: Path) -> Iterator[Path]:
    """Audio files under ``src`` in a stable order, found lazily."""
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                yield Path(root) / name


def recording_to_cut(rec: Recording, channel: str) -> Union[MonoCut, MultiCut]:
    """One cut covering the recording; ``channel``: ``first`` keeps channel 0, ``mix`` keeps all
    channels, which the dataset averages on load."""
    if rec.num_channels == 1 or channel == "first":
        return MonoCut(id=rec.id, start=0.0, duration=rec.duration, channel=0, recording=rec)
    if channel != "mix":
        raise ValueError(f"--channel must be first or mix, not {channel!r}")
    return MultiCut(id=rec.id, start=0.0, duration=rec.duration, channel=list(range(rec.num_channels)), recording=rec)


def wav_truncation(path: Path) -> Optional[str]:
    """For a RIFF/WAVE file whose data chunk declares more bytes than the file holds, say so.
    (libsndfile silently reads such a file as a shorter one.)"""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = path.stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, length = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"data":
                available = size - f.tell()
                if length != 0xFFFFFFFF and length > available:
                    return f"corrupt: truncated wav, data chunk declares {length} bytes but the file holds {available}"
                return None
            f.seek(length + (length & 1), 1)


def probe(path: Path, min_duration: float, check_audio: bool = True) -> Union[Recording, Rejection]:
    """A Recording for a usable file, or the reason it is not usable. Decodes the file once to catch
    corrupt, truncated and silent audio that a header alone would not reveal."""
    p = str(path)
    if not path.exists():
        return Rejection(p, "missing")
    if path.stat().st_size == 0:
        return Rejection(p, "empty")
    truncated = wav_truncation(path) if path.suffix.lower() == ".wav" else None
    if truncated:
        return Rejection(p, truncated)
    try:
        rec = Recording.from_file(path, recording_id=path.stem)
    except Exception as e:  # any decoder error means unreadable
        return Rejection(p, f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip())
    return check_recording(rec, p, min_duration, check_audio)


def check_recording(rec: Recording, source: str, min_duration: float, check_audio: bool = True) -> Union[Recording, Rejection]:
    """``rec`` if its audio is usable, else why not: empty, too short, corrupt, truncated or silent."""
    if rec.num_samples <= 0 or rec.duration <= 0:
        return Rejection(source, "empty")
    if rec.duration < min_duration:
        return Rejection(source, f"too short: {rec.duration:.3f} s < --min-duration {min_duration} s")
    if not check_audio:
        return rec
    try:
        audio = rec.load_audio()
    except Exception as e:
        return Rejection(source, f"corrupt: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip())
    decoded = audio.shape[-1] / rec.sampling_rate
    if abs(decoded - rec.duration) > DURATION_TOLERANCE:
        return Rejection(source, f"corrupt: header says {rec.duration:.3f} s, decoded {decoded:.3f} s (truncated?)")
    if not np.isfinite(audio).all():
        return Rejection(source, "corrupt: non-finite samples")
    if np.abs(audio).max() < SILENCE_PEAK:
        return Rejection(source, "zero energy")
    return rec


def _star(args):
    fn, *rest = args
    return fn(*rest)


def parallel_map(fn: Callable, items: Iterable[tuple], jobs: int) -> Iterator:
    """``fn(*item)`` for each item, in ``jobs`` processes, in input order, with bounded memory."""
    if jobs <= 1:
        yield from (fn(*item) for item in items)
        return
    with ProcessPoolExecutor(jobs) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(_star, (fn, *item)))
            if len(window) >= 64 * jobs:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def probe_all(paths: Iterable[Path], min_duration: float, jobs: int) -> Iterator[Union[Recording, Rejection]]:
    """``probe`` over many files in parallel, in input order."""
    return parallel_map(probe, ((p, min_duration) for p in paths), jobs)


class SetWriter:
    """Writes cuts.jsonl.gz, rejected.jsonl and summary.json of one output folder."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cuts = CutSet.open_writer(self.out_dir / "cuts.jsonl.gz", overwrite=True)
        self.rejected = open(self.out_dir / "rejected.jsonl", "w")
        self.durations: list[float] = []
        self.reasons: Counter = Counter()
        self.seen_ids: set[str] = set()
        self.recording_files: dict[str, str] = {}  # recording id -> its audio file

    def add_cut(self, cut, source: str) -> None:
        """Write ``cut``; a cut id seen before, or a recording id naming another file, is a duplicate."""
        rec_id = cut.recording.id if cut.has_recording else cut.id
        audio = str(cut.recording.sources[0].source) if cut.has_recording else source
        first = self.recording_files.setdefault(rec_id, audio)
        if cut.id in self.seen_ids or first != audio:
            self.reject(Rejection(source, f"duplicate id {rec_id!r} (first seen in {first})"))
            return
        self.seen_ids.add(cut.id)
        self.cuts.write(cut)
        self.durations.append(cut.duration)

    def reject(self, r: Rejection) -> None:
        self.rejected.write(json.dumps({"path": r.path, "reason": r.reason}) + "\n")
        self.reasons[r.reason.split(":")[0]] += 1

    def close(self) -> dict:
        self.cuts.close()
        self.rejected.close()
        d = np.array(self.durations) if self.durations else np.zeros(0)
        summary = {
            "num_cuts": len(self.durations),
            "hours": float(d.sum() / 3600),
            "num_rejected": sum(self.reasons.values()),
            "rejected_by_reason": dict(self.reasons),
            "duration_percentiles": {
                str(q): float(np.percentile(d, q)) for q in (0, 1, 5, 25, 50, 75, 95, 99, 100)
            } if len(d) else {},
        }
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


class NothingUsable(RuntimeError):
    """No input gave a usable cut; the message says why."""


def finish(writer: SetWriter, what: str) -> dict:
    """Close the writer; fail when nothing was usable, naming the reasons."""
    summary = writer.close()
    if summary["num_cuts"] == 0:
        raise NothingUsable(
            f"no usable audio in {what}: {summary['num_rejected']} files rejected "
            f"({summary['rejected_by_reason'] or 'none found'}); see {writer.out_dir / 'rejected.jsonl'}"
        )
    return summary


def window_cut(cut, window: Optional[float]):
    """Cuts of at most ``window`` seconds covering ``cut`` (the last one may be shorter)."""
    if not window or cut.duration <= window:
        return [cut]
    return list(cut.cut_into_windows(duration=window))


def prepare_audio_dir(
    src: Path, out_dir: Path, *, channel: str = "first", min_duration: float = 0.1,
    max_duration: Optional[float] = None, window: Optional[float] = None, jobs: int = 1,
) -> dict:
    """``prepare.py audio-dir``: every audio file under ``src`` becomes a cut (or a rejection)."""
    src = Path(src)
    if not src.is_dir():
        raise NothingUsable(f"{src} is not a folder")
    writer = SetWriter(out_dir)
    paths = list(find_audio(src))
    for path, result in zip(paths, tqdm(probe_all(paths, min_duration, jobs), total=len(paths), desc="audio-dir")):
        if isinstance(result, Rejection):
            writer.reject(result)
        else:
            add_windows(writer, recording_to_cut(result, channel), str(path), min_duration, max_duration, window)
    return finish(writer, str(src))


def add_windows(writer: SetWriter, cut, source: str, min_duration: float, max_duration: Optional[float],
                window: Optional[float]) -> None:
    """Write ``cut`` (cut into windows when asked), rejecting what is too long and dropping short tails."""
    for piece in window_cut(cut, window):
        if max_duration is not None and piece.duration > max_duration:
            writer.reject(Rejection(source, f"too long: {piece.duration:.2f} s > --max-duration {max_duration} s"))
        elif piece.duration >= min_duration or piece is cut:
            writer.add_cut(piece, source)
