"""Audio folders -> Lhotse CutSets, with every left-out file reported and a summary.

Each output folder gets ``cuts.jsonl.gz`` (in a seeded random order), ``rejected.jsonl`` (one line
per input left out: path, kind and reason) and ``summary.json``, each written atomically. Nothing is
held per cut beyond a duration (8 bytes): cuts stream through an external shuffle on disk.

Ids are unique by construction: the path relative to the source folder without its extension
(``spk2/001``), or with it where two audio files of a folder share a stem (``spk2/x.wav``,
``spk2/x.flac``). Windows of a long file get lhotse's ``{id}-{i}``; a file whose own id is one of those
(``utt.wav`` windowed beside ``utt-1.wav``) is the one case left, rejected as a duplicate and listed in
rejected.jsonl. Audio paths are stored absolute and resolved, so a manifest works from any folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from array import array
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
from lhotse import MonoCut, MultiCut, Recording
from tqdm import tqdm

from cuts.console import error_line
from cuts.io import ExternalShuffle, atomic_write, write_text
from cuts.lock import folder_lock
from cuts.workers import process_pool

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = {".wav", ".flac", ".sph", ".mp3", ".opus", ".ogg", ".m4a", ".aac", ".aif", ".aiff", ".wma"}
SILENCE_PEAK = 1e-5  # a file whose peak stays below this (about -100 dBFS) has no usable energy
DURATION_TOLERANCE = 0.01  # seconds between the header's duration and the decoded one

# Kinds of rejection: summary.json counts them, rejected.jsonl gives each with its full reason.
MISSING, EMPTY, UNREADABLE, CORRUPT, ZERO_ENERGY = "missing", "empty", "unreadable", "corrupt", "zero energy"
TOO_SHORT, TOO_LONG, DUPLICATE, BAD_LINE = "too short", "too long", "duplicate", "bad manifest line"
PAST_END, NO_RECORDING = "segment past the end", "no recording"


@dataclass
class Rejection:
    path: str  # the audio file (or the manifest line when there is no file)
    kind: str  # one of the kinds above
    detail: str = ""
    where: str = ""  # manifest:line, for inputs listed in a manifest

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


def whole_names(names: Iterable[str]) -> set[str]:
    """The audio file names of one folder whose id keeps the extension: those whose stem another file
    shares, and those whose stem equals such a kept name (x.wav.flac beside x.wav and x.flac)."""
    names = list(names)
    stems = Counter(Path(n).stem for n in names)
    whole = {n for n in names if stems[Path(n).stem] > 1}
    while True:
        clash = {n for n in names if n not in whole and Path(n).stem in whole}
        if not clash:
            return whole
        whole |= clash


def file_id(name: str, whole: set[str]) -> str:
    """The id part of one file name: the name itself when it is in ``whole``, else its stem."""
    return name if name in whole else Path(name).stem


def is_audio(name: str) -> bool:
    return Path(name).suffix.lower() in AUDIO_EXTENSIONS


def find_audio(src: Path, skipped: Optional[Counter] = None) -> Iterator[tuple[Path, str]]:
    """``(path, id)`` of the audio files under ``src``, in a stable order, found lazily (one folder's
    names in memory at a time). Linked folders are followed; a folder reached a second time (a link loop, two
    links to one folder) and one that cannot be listed are skipped with a warning, and ``skipped`` counts them,
    and the files that are not audio, by kind."""
    skipped = Counter() if skipped is None else skipped
    seen = {_folder_key(src)}

    def unreadable(e: OSError) -> None:
        skipped["unreadable folders"] += 1
        log.warning("%s: skipped, cannot list it (%s)", e.filename, e.strerror)

    for root, dirs, files in os.walk(src, onerror=unreadable, followlinks=True):
        keep = []
        for d in sorted(dirs):
            try:
                key = _folder_key(Path(root) / d)
            except OSError as e:
                unreadable(e)
                continue
            if key in seen:
                skipped["folders reached again through a link"] += 1
                log.warning("%s: skipped, it leads to %s, which is read once already", Path(root) / d,
                            os.path.realpath(Path(root) / d))
                continue
            seen.add(key)
            keep.append(d)
        dirs[:] = keep
        rel = Path(root).relative_to(src)
        names = sorted(n for n in files if is_audio(n))
        skipped["files not audio (by extension)"] += len(files) - len(names)
        whole = whole_names(names)
        for name in names:
            yield Path(root) / name, (rel / file_id(name, whole)).as_posix()


def _folder_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)  # follows the link
    return st.st_dev, st.st_ino


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
                    return f"truncated wav, data chunk declares {length} bytes but the file holds {available}"
                return None
            f.seek(length + (length & 1), 1)


def probe(path: Path, rec_id: str, min_duration: float, check_audio: bool = True) -> Union[Recording, Rejection]:
    """A Recording (id ``rec_id``, resolved path) for a usable file, or the reason it is not usable.
    Decodes the file once to catch corrupt, truncated and silent audio that a header would not reveal."""
    p = str(path)
    if not path.is_file():
        return Rejection(p, MISSING)
    if path.stat().st_size == 0:
        return Rejection(p, EMPTY)
    truncated = wav_truncation(path) if path.suffix.lower() == ".wav" else None
    if truncated:
        return Rejection(p, CORRUPT, truncated)
    try:
        rec = Recording.from_file(path.resolve(), recording_id=rec_id)
    except Exception as e:  # any decoder error means unreadable
        return Rejection(p, UNREADABLE, error_line(e))
    return check_recording(rec, p, min_duration, check_audio)


def check_recording(rec: Recording, source: str, min_duration: float, check_audio: bool = True) -> Union[Recording, Rejection]:
    """``rec`` if its audio is usable, else why not: empty, too short, corrupt, truncated or silent."""
    if rec.num_samples <= 0 or rec.duration <= 0:
        return Rejection(source, EMPTY)
    if rec.duration < min_duration:
        return Rejection(source, TOO_SHORT, f"{rec.duration:.3f} s < --min-duration {min_duration} s")
    if not check_audio:
        return rec
    try:
        audio = rec.load_audio()
    except Exception as e:
        return Rejection(source, CORRUPT, error_line(e))
    decoded = audio.shape[-1] / rec.sampling_rate
    if abs(decoded - rec.duration) > DURATION_TOLERANCE:
        return Rejection(source, CORRUPT, f"header says {rec.duration:.3f} s, decoded {decoded:.3f} s (truncated?)")
    if not np.isfinite(audio).all():
        return Rejection(source, CORRUPT, "non-finite samples")
    if np.abs(audio).max() < SILENCE_PEAK:
        return Rejection(source, ZERO_ENERGY)
    return rec


def _star(args):
    fn, *rest = args
    return fn(*rest)


def parallel_map(fn: Callable, items: Iterable[tuple[tuple, Any]], jobs: int) -> Iterator[tuple[Any, Any]]:
    """``(context, fn(*args))`` for each ``(args, context)`` of ``items``, in ``jobs`` processes, in input
    order; at most ``64 * jobs`` items are in flight, so memory stays bounded."""
    if jobs <= 1:
        yield from ((context, fn(*args)) for args, context in items)
        return
    with process_pool(jobs) as pool:
        window: deque = deque()
        for args, context in items:
            window.append((context, pool.submit(_star, (fn, *args))))
            if len(window) >= 64 * jobs:
                context, future = window.popleft()
                yield context, future.result()
        while window:
            context, future = window.popleft()
            yield context, future.result()


class SetWriter:
    """Writes cuts.jsonl.gz (shuffled with ``seed``), rejected.jsonl and summary.json of one output
    folder. Use as a context manager: it holds the folder's lock (a second writer refuses, naming this one) and keeps
    its temporary files in a folder of its own; an exception leaves the folder's previous files as they were."""

    def __init__(self, out_dir: Path, seed: int = 0):
        self.out_dir = Path(out_dir)
        self.seed = seed
        self.kinds: Counter = Counter()
        self.first_rejections: list[str] = []
        self.skipped: Counter = Counter()  # what is not an input at all (folders, other files), by kind
        self.summary: Optional[dict] = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "SetWriter":
        with self._stack as stack:
            self.tmp = stack.enter_context(folder_lock(self.out_dir))
            self.shuffle = ExternalShuffle(self.tmp / "shuffle", self.seed)
            self._rejected_file = atomic_write(self.out_dir / "rejected.jsonl", tmp_dir=self.tmp)
            self.rejected = self._rejected_file.__enter__()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.summary is None:  # not closed: an exception on the way
                self._rejected_file.__exit__(exc_type or RuntimeError, exc, tb)
        finally:
            self._stack.__exit__(exc_type, exc, tb)

    def add_cut(self, cut, source: str) -> None:
        """Queue ``cut``; a later cut with the same id is rejected as a duplicate when the set is closed."""
        head = json.dumps([cut.id, cut.duration, source])
        self.shuffle.add(cut.id, f"{head}\t{json.dumps(cut.to_dict())}")

    def reject(self, r: Rejection) -> None:
        line = {"path": r.path, "kind": r.kind, "reason": r.reason}
        if r.where:
            line["where"] = r.where
        self.rejected.write(json.dumps(line) + "\n")
        self.kinds[r.kind] += 1
        if len(self.first_rejections) < 3:
            self.first_rejections.append(f"{r.path}: {r.reason}")

    def close(self, what: str) -> dict:
        """Drop repeated ids (one hash shard at a time), write the cuts shuffled, then the summary. Nothing
        usable from ``what`` raises NothingUsable and leaves the folder's previous files as they were."""
        durations = array("d")
        with atomic_write(self.out_dir / "cuts.jsonl.gz", tmp_dir=self.tmp) as out:
            for shard, lines in self.shuffle.shards():
                first: dict[str, str] = {}
                kept = []
                for line in lines:
                    head, body = line.split("\t", 1)
                    cut_id, duration, source = json.loads(head)
                    if cut_id in first:
                        self.reject(Rejection(source, DUPLICATE, f"id {cut_id!r} listed again (first in {first[cut_id]})"))
                        continue
                    first[cut_id] = source
                    kept.append(body)
                    durations.append(duration)
                self.shuffle.rng(shard).shuffle(kept)
                out.writelines(body + "\n" for body in kept)
            if not durations and not self.kinds:
                raise NothingUsable(f"nothing to prepare in {what}: it holds no audio file (or manifest line); "
                                    f"check the path; {self.out_dir} is left as it was")
            if not durations:  # inside the atomic writes: an empty set never replaces a previous one
                raise NothingUsable(
                    f"no usable audio in {what}: {sum(self.kinds.values())} inputs rejected "
                    f"({dict(self.kinds.most_common()) or 'none found'}), e.g. {'; '.join(self.first_rejections) or '-'}; "
                    f"{self.out_dir} is left as it was")
        self._rejected_file.__exit__(None, None, None)
        d = np.frombuffer(durations, dtype=np.float64) if len(durations) else np.zeros(0)
        self.summary = {
            "num_cuts": len(d),
            "hours": float(d.sum() / 3600),
            "num_rejected": sum(self.kinds.values()),
            "rejected_by_reason": dict(self.kinds.most_common()),
            "skipped": {k: n for k, n in self.skipped.most_common() if n},
            "duration_percentiles": {
                str(q): float(np.percentile(d, q)) for q in (0, 1, 5, 25, 50, 75, 95, 99, 100)
            } if len(d) else {},
            "shuffle_seed": self.seed,
        }
        write_text(self.out_dir / "summary.json", json.dumps(self.summary, indent=1), tmp_dir=self.tmp)
        rejected = self.summary["num_rejected"]
        if rejected >= 0.1 * (rejected + len(d)):  # a tenth of the inputs or more: worth a line, not only a file
            kind, n = self.kinds.most_common(1)[0]
            fix = {TOO_SHORT: "; lower --min-duration to keep short recordings", TOO_LONG: "; raise --max-duration "
                   "or cut long recordings with --window 30"}.get(kind, "")
            log.warning("%d of %d inputs rejected, %d of them %s (%s lists each)%s", rejected, rejected + len(d), n,
                        kind, self.out_dir / "rejected.jsonl", fix)
        return self.summary


class NothingUsable(RuntimeError):
    """No input gave a usable cut; the message says why."""


def finish(writer: SetWriter, what: str) -> dict:
    """Close the writer; fail when nothing was usable, naming the reasons (the previous files stay)."""
    return writer.close(what)


def window_cut(cut, window: Optional[float]):
    """Cuts of at most ``window`` seconds covering ``cut`` (the last one may be shorter)."""
    if not window or cut.duration <= window:
        return [cut]
    return list(cut.cut_into_windows(duration=window))


def add_windows(writer: SetWriter, cut, source: str, min_duration: float, max_duration: Optional[float],
                window: Optional[float], where: str = "") -> None:
    """Write ``cut`` (cut into windows when asked), rejecting what is too long and dropping short tails."""
    for piece in window_cut(cut, window):
        if max_duration is not None and piece.duration > max_duration:
            writer.reject(Rejection(source, TOO_LONG, f"{piece.duration:.2f} s > --max-duration {max_duration} s", where))
        elif piece.duration >= min_duration or piece is cut:
            writer.add_cut(piece, source)


def prepare_audio_dir(
    src: Path, out_dir: Path, *, channel: str = "first", min_duration: float = 0.1,
    max_duration: Optional[float] = None, window: Optional[float] = None, jobs: int = 1, seed: int = 0,
) -> dict:
    """``prepare.py audio-dir``: every audio file under ``src`` becomes a cut (or a rejection)."""
    src = Path(os.path.abspath(src))  # absolute without "..": paths in cuts and rejected.jsonl read anywhere
    if not src.is_dir():
        raise NothingUsable(f"{src} is not a folder")
    with SetWriter(out_dir, seed) as writer:
        items = (((path, rec_id, min_duration), None) for path, rec_id in find_audio(src, writer.skipped))
        for _, result in tqdm(parallel_map(probe, items, jobs), desc="audio-dir", unit=" files"):
            if isinstance(result, Rejection):
                writer.reject(result)
            else:
                source = result.sources[0].source
                add_windows(writer, recording_to_cut(result, channel), source, min_duration, max_duration, window)
        return finish(writer, str(src))
