"""Other inputs than audio folders: NeMo manifests, Lhotse manifests, Lhotse recipes; Shar export.

Every builder writes an output folder through SetWriter (cuts.jsonl.gz shuffled, rejected.jsonl,
summary.json) and validates audio as ``audio-dir`` does, so a bad file is reported and skipped. Inputs
stream: consecutive entries of the same audio file are checked once, and nothing is kept per entry.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

from lhotse import Recording, SupervisionSegment
from lhotse.cut import Cut
from lhotse.qa import validate
from lhotse.serialization import deserialize_item
from tqdm import tqdm

from cuts.console import error_line
from cuts.io import ExternalShuffle, iter_jsonl
from cuts.lock import replace_lock
from cuts.shar import is_url, write_shar_index
from cuts.prepare import (
    BAD_LINE, DURATION_TOLERANCE, MISSING, NO_RECORDING, PAST_END, TOO_SHORT, NothingUsable, Rejection, SetWriter,
    add_windows, check_recording, file_id, finish, is_audio, parallel_map, probe, recording_to_cut, whole_names,
)

log = logging.getLogger(__name__)
RECIPES = ("librispeech", "mini_librispeech", "musan")
# The audio formats of lhotse's Shar writer (lhotse.shar.writers.shar.resolve_writer); lossless first.
SHAR_AUDIO_FORMATS = ("flac", "wav", "mp3", "opus")
SHAR_STREAMS_HINT = 16  # streams of a common run (8 GPUs x 2 workers): fewer shards than this get a warning at export


class NemoIds:
    """Ids of NeMo manifest entries: the audio path relative to the deepest folder holding the
    manifests and every audio file, named as ``audio-dir`` names files (extension kept where two
    audio files of a folder share a stem). Folders are listed once, and only those that need it."""

    def __init__(self, manifests: Sequence[Path]):
        self.manifests = [Path(m).absolute() for m in manifests]
        self.root = os.path.commonpath([str(m.parent) for m in self.manifests])
        for m in self.manifests:  # a first pass over the lines, to find the common folder
            for _, entry in iter_jsonl(m, on_error=lambda where, problem: None):
                path = self.audio_path(m, entry)
                if path is not None and not path.startswith(self.root.rstrip(os.sep) + os.sep):
                    self.root = os.path.commonpath([self.root, os.path.dirname(path)])
        self.whole_names: dict[str, frozenset] = {}  # folder -> audio names that keep their extension

    @staticmethod
    def audio_path(manifest: Path, entry: dict) -> Optional[str]:
        """The entry's audio file as an absolute, normalized path (relative ones start at the manifest's folder)."""
        value = entry.get("audio_filepath")
        if not isinstance(value, str) or not value:
            return None
        return os.path.normpath(os.path.join(manifest.parent, os.path.expanduser(value)))

    def __call__(self, path: str) -> str:
        folder, name = os.path.split(path)
        if folder not in self.whole_names:
            try:
                names = [n for n in os.listdir(folder) if is_audio(n)]
            except OSError:
                names = []
            self.whole_names[folder] = frozenset(whole_names(names))
        rel = Path(os.path.relpath(path, self.root))
        return rel.with_name(file_id(name, self.whole_names[folder])).as_posix()


def nemo_segments(manifest: Path, ids: NemoIds, writer: SetWriter) -> Iterator[tuple[str, str, dict]]:
    """``(audio path, id, segment)`` per valid line; a line that is not a usable entry is rejected."""
    def bad(where: str, problem: str) -> None:
        writer.reject(Rejection(where, BAD_LINE, problem, where))

    for where, entry in iter_jsonl(manifest, on_error=bad):
        path = ids.audio_path(manifest, entry)
        if path is None:
            bad(where, "no audio_filepath string")
            continue
        try:
            offset = float(entry.get("offset") or 0.0)
            duration = None if entry.get("duration") is None else float(entry["duration"])
        except (TypeError, ValueError) as e:
            bad(where, f"offset or duration is not a number ({e})")
            continue
        text = entry.get("text")
        yield path, ids(path), {"where": where, "offset": offset, "duration": duration,
                                "text": None if text is None else str(text)}


def prepare_nemo_manifests(
    manifests: Sequence[Path], out_dir: Path, *, channel: str = "first", min_duration: float = 0.1,
    max_duration: Optional[float] = None, window: Optional[float] = None, jobs: int = 1, seed: int = 0,
) -> dict:
    """``prepare.py nemo-manifest``: NeMo manifest lines (audio_filepath, duration, offset, text) -> cuts.

    Relative paths resolve against the manifest's folder; consecutive lines of the same audio file
    (segments) share one check of that file. A segment's id is the file's id, plus ``-OFFSET-DURATION``
    in milliseconds when it is not the whole file.
    """
    for m in manifests:
        if not Path(m).is_file():
            raise FileNotFoundError(f"NeMo manifest {m} does not exist")
    ids = NemoIds(manifests)
    with SetWriter(out_dir, seed) as writer:
        lines = itertools.chain.from_iterable(nemo_segments(m, ids, writer) for m in ids.manifests)
        groups = (((Path(path), rec_id, 0.0), [s for _, _, s in group])
                  for (path, rec_id), group in itertools.groupby(lines, key=lambda x: x[:2]))
        for segments, rec in tqdm(parallel_map(probe, groups, jobs), desc="nemo-manifest", unit=" files"):
            for s in segments:
                add_segment(writer, rec, s, channel, min_duration, max_duration, window)
        return finish(writer, ", ".join(map(str, manifests)))


def add_segment(writer: SetWriter, rec, s: dict, channel: str, min_duration: float, max_duration: Optional[float],
                window: Optional[float]) -> None:
    """The cut of one NeMo line, or its rejection."""
    where = s["where"]
    if isinstance(rec, Rejection):
        writer.reject(Rejection(rec.path, rec.kind, rec.detail, where))
        return
    source = rec.sources[0].source
    offset = s["offset"]
    duration = rec.duration - offset if s["duration"] is None else s["duration"]
    if offset < 0 or offset + duration > rec.duration + DURATION_TOLERANCE:
        writer.reject(Rejection(source, PAST_END, f"{offset:.2f}+{duration:.2f} s, the file has {rec.duration:.2f} s", where))
        return
    if duration < min_duration:
        writer.reject(Rejection(source, TOO_SHORT, f"{duration:.3f} s < --min-duration {min_duration} s", where))
        return
    whole = offset == 0 and abs(duration - rec.duration) < DURATION_TOLERANCE
    cut_id = rec.id if whole else f"{rec.id}-{round(offset * 1000):08d}-{round(duration * 1000):08d}"
    cut = recording_to_cut(rec, channel).truncate(offset=offset, duration=min(duration, rec.duration - offset))
    cut = cut.with_id(cut_id)
    if s["text"] is not None:
        cut.supervisions = [SupervisionSegment(id=cut_id, recording_id=rec.id, start=0.0, duration=cut.duration,
                                               text=s["text"])]
    add_windows(writer, cut, source, min_duration, max_duration, window, where)


def _check_group(rec: Recording, source: str, min_duration: float):
    missing = [s.source for s in rec.sources if s.type == "file" and not os.path.isfile(s.source)]
    if missing:
        return Rejection(source, MISSING, "no such file" if missing == [source] else f"no such file: {missing[0]}")
    return check_recording(rec, source, min_duration)


def make_absolute(rec: Recording) -> Recording:
    """``rec`` with its relative file sources made absolute and resolved against the current folder, in
    place (absolute ones are kept as given: checking them would cost a file-system lookup per cut)."""
    for s in rec.sources:
        if s.type == "file" and not os.path.isabs(s.source):
            s.source = str(Path(s.source).resolve())
    return rec


def find_relative(rec: Recording, manifest_dir: Path) -> Optional[str]:
    """Make ``rec``'s relative file sources absolute, in place: from the working folder, where lhotse reads them,
    else from the manifest's folder; where neither holds the file, say so (None when all were found)."""
    for s in rec.sources:
        if s.type != "file" or os.path.isabs(s.source):
            continue
        tried = [Path(s.source).resolve(), (manifest_dir / s.source).resolve()]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            return (f"relative path {s.source!r} found neither from the working folder ({tried[0]}) nor from the "
                    f"manifest's folder ({tried[1]}): run from the folder the paths start at, or make them absolute")
        s.source = str(found)
    return None


def write_validated(
    writer: SetWriter, cuts: Iterator[tuple[str, Cut]], *, min_duration: float, max_duration: Optional[float],
    window: Optional[float], jobs: int, desc: str,
) -> None:
    """Check the recording of each run of consecutive cuts once (in parallel), then write the cuts of
    good ones. ``cuts`` gives ``(where, cut)``."""
    def runs():
        for rec_id, group in itertools.groupby(cuts, key=lambda x: _recording_id(x[1])):
            group = list(group)
            if rec_id is None:
                for where, cut in group:
                    writer.reject(Rejection(where, NO_RECORDING, f"cut {cut.id!r} ({type(cut).__name__})", where))
                continue
            rec = make_absolute(group[0][1].recording)
            for _, cut in group:
                cut.recording = rec  # one checked recording for the run (each cut was read with its own copy)
            yield (rec, rec.sources[0].source, 0.0), group

    for group, result in tqdm(parallel_map(_check_group, runs(), jobs), desc=desc, unit=" recordings"):
        for where, cut in group:
            source = cut.recording.sources[0].source
            if isinstance(result, Rejection):
                writer.reject(Rejection(source, result.kind, result.detail, where))
            elif cut.duration < min_duration:
                writer.reject(Rejection(source, TOO_SHORT, f"{cut.duration:.3f} s < --min-duration {min_duration} s", where))
            else:
                add_windows(writer, cut, source, min_duration, max_duration, window, where)


def _recording_id(cut: Cut) -> Optional[tuple]:
    """The recording's id and sources: two corpora may reuse an id for different files."""
    rec = getattr(cut, "recording", None)  # MixedCut and PaddingCut have none
    return None if rec is None else (rec.id, tuple(s.source for s in rec.sources))


def manifest_cuts(manifests: Sequence[Path], channel: str, writer: SetWriter) -> Iterator[tuple[str, Cut]]:
    """``(where, cut)`` per line of Lhotse CutSet or RecordingSet manifests; other lines are rejected, and so are
    cuts whose relative audio paths lead nowhere (see :func:`find_relative`)."""
    def bad(where: str, problem: str) -> None:
        writer.reject(Rejection(where, BAD_LINE, problem, where))

    for m in manifests:
        if not is_url(str(m)) and not Path(m).is_file():
            raise FileNotFoundError(f"manifest {m} does not exist")
        manifest_dir = Path(os.path.abspath(m)).parent
        for where, d in iter_jsonl(m, on_error=bad):
            try:
                item = deserialize_item(d)
            except Exception as e:
                bad(where, f"not a Lhotse cut or recording ({_short(e)})")
                continue
            problem = malformed(item)
            if problem:
                bad(where, problem)
                continue
            if isinstance(item, Recording):
                item = recording_to_cut(item, channel)
            rec = getattr(item, "recording", None)
            lost = None if rec is None else find_relative(rec, manifest_dir)
            if lost:
                writer.reject(Rejection(rec.sources[0].source, MISSING, lost, where))
                continue
            yield where, item


def malformed(item) -> Optional[str]:
    """What makes a deserialized manifest item unusable, or None: lhotse builds cuts and recordings from any values,
    and its own checks (lhotse.qa.validate: positive durations, a recording that holds the cut) say which are not."""
    if not isinstance(item, (Cut, Recording)):
        return f"a {type(item).__name__}, not a cut or recording"
    if not isinstance(item.id, str) or not item.id:
        return f"its id is {item.id!r}, not a non-empty string"
    rec = item if isinstance(item, Recording) else getattr(item, "recording", None)
    if rec is not None and not (isinstance(rec.sources, list) and rec.sources and all(
            isinstance(getattr(src, "source", None), str) for src in rec.sources)):
        return f"recording {rec.id!r}: sources must be a list of audio sources (type, channels, source)"
    try:
        validate(item)
    except Exception as e:
        return error_line(e)
    return None


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def prepare_lhotse_manifest(
    manifests: Sequence[Path], out_dir: Path, *, channel: str = "first", min_duration: float = 0.1,
    max_duration: Optional[float] = None, window: Optional[float] = None, jobs: int = 1, seed: int = 0,
) -> dict:
    """``prepare.py manifest``: existing Lhotse CutSet or RecordingSet manifests -> checked cuts."""
    with SetWriter(out_dir, seed) as writer:
        write_validated(writer, manifest_cuts(manifests, channel, writer), min_duration=min_duration,
                        max_duration=max_duration, window=window, jobs=jobs, desc="manifest")
        return finish(writer, ", ".join(map(str, manifests)))


def recipe_cuts(corpus: str, corpus_dir: Path, download: bool, parts: Optional[Sequence[str]]) -> Iterator[tuple[str, Cut]]:
    """``(part, cut)`` of a corpus through Lhotse's recipe (downloading only when asked), part by part."""
    from lhotse import CutSet
    from lhotse.recipes import download_librispeech, download_musan, prepare_librispeech, prepare_musan

    corpus_dir = Path(corpus_dir)
    if corpus in ("librispeech", "mini_librispeech"):
        if download:
            download_librispeech(corpus_dir.parent, dataset_parts=corpus)
        manifests = prepare_librispeech(corpus_dir, dataset_parts=list(parts) if parts else
                                        ("mini_librispeech" if corpus == "mini_librispeech" else "auto"))
    elif corpus == "musan":
        if download:
            download_musan(corpus_dir.parent)
        manifests = prepare_musan(corpus_dir, parts=list(parts) if parts else ("music", "speech", "noise"))
    else:
        raise ValueError(f"unknown recipe {corpus!r}; available: {', '.join(RECIPES)}")
    for part in sorted(manifests):
        m = manifests[part]
        for cut in CutSet.from_manifests(recordings=m["recordings"], supervisions=m.get("supervisions")):
            yield part, cut


def prepare_recipe(
    corpus: str, corpus_dir: Path, out_dir: Path, *, download: bool = False, parts: Optional[Sequence[str]] = None,
    min_duration: float = 0.1, max_duration: Optional[float] = None, window: Optional[float] = None, jobs: int = 1,
    seed: int = 0,
) -> dict:
    """``prepare.py recipe``: LibriSpeech (all parts, mini too) or MUSAN (music, speech, noise) -> checked cuts."""
    if not download and not Path(corpus_dir).is_dir():
        raise FileNotFoundError(f"{corpus_dir} does not exist; pass --download to fetch {corpus}")
    with SetWriter(out_dir, seed) as writer:
        write_validated(writer, recipe_cuts(corpus, Path(corpus_dir), download, parts), min_duration=min_duration,
                        max_duration=max_duration, window=window, jobs=jobs, desc=corpus)
        return finish(writer, f"{corpus} at {corpus_dir}")


def export_shar(cuts_path: Path, out_dir: Path, shard_size: int = 1000, seed: int = 0,
                audio_format: str = "flac") -> dict:
    """``prepare.py shar``: a CutSet with its audio in Lhotse Shar shards, in a seeded random order, and
    ``shar_index.json`` naming the shards (for URLs). ``audio_format`` is any audio format of lhotse's Shar
    writer (``SHAR_AUDIO_FORMATS``): flac (16-bit, about half the bytes of wav, decoded at a few thousand
    audio-s/s a core) or wav (16-bit PCM, read almost for free; see BENCHMARKS.md). The folder appears
    complete or not at all; a cut whose audio fails to load is reported and left out. Fields other than the
    audio (k-means ``targets``) stay references to their files, which must be readable where training runs.
    Training reads the shards with world size x data.num_workers streams, one shard at least each: the result
    and a log line say how many the export feeds."""
    from lhotse.cut.set import deserialize_cut
    from lhotse.shar import SharWriter

    if audio_format not in SHAR_AUDIO_FORMATS:
        raise ValueError(f"--audio-format {audio_format!r}: use one of {', '.join(SHAR_AUDIO_FORMATS)}")
    out_dir = Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: give at least 1 cut per shard")
    with replace_lock(out_dir) as work:  # one export per out folder; its files in a folder of its own
        tmp = work / "shar"
        shuffle = ExternalShuffle(work / "shuffle", seed)
        failed: list[dict] = []
        for where, d in iter_jsonl(cuts_path, on_error=lambda where, problem: failed.append(
                {"id": None, "where": where, "reason": f"{BAD_LINE}: {problem}"})):
            shuffle.add(str(d.get("id")), json.dumps([where, d]))
        tmp.mkdir(parents=True)
        written = 0
        with SharWriter(tmp, fields={"recording": audio_format}, shard_size=shard_size) as writer:
            for line in tqdm(shuffle.shuffled(), total=shuffle.count, desc="shar"):
                where, d = json.loads(line)
                try:
                    cut = deserialize_cut(d)
                except Exception as e:
                    cut, problem = None, f"not a Lhotse cut ({_short(e)})"
                else:
                    problem = malformed(cut)
                if problem:
                    failed.append({"id": d.get("id"), "where": where, "reason": f"{BAD_LINE}: {problem}"})
                    continue
                try:
                    writer.write(cut)
                    written += 1
                except Exception as e:  # the audio did not load: report, skip
                    failed.append({"id": cut.id, "where": where, "reason": error_line(e)})
                    log.warning("shar: cut %s left out: %s", cut.id, failed[-1]["reason"])
            num_shards = len(writer.output_paths["cuts"])
            write_shar_index(tmp, writer.output_paths)  # lets training read the shards from a URL
        if not written:
            raise NothingUsable(f"no cut of {cuts_path} could be exported ({len(failed)} lines"
                                f"{', e.g. ' + failed[0]['where'] + ': ' + failed[0]['reason'] if failed else ''}); "
                                f"{out_dir} is left as it was")
        if out_dir.exists():
            os.replace(out_dir, work / "old")
        os.replace(tmp, out_dir)
    num_cuts = written
    hint = ""
    if num_shards < SHAR_STREAMS_HINT:
        hint = (f"; for {SHAR_STREAMS_HINT} streams (e.g. 8 GPUs x 2 workers) export with --shard-size "
                f"{num_cuts // SHAR_STREAMS_HINT}" if num_cuts >= SHAR_STREAMS_HINT else
                f"; its {num_cuts} cuts feed at most {num_cuts} streams, with --shard-size 1")
    log.log(logging.WARNING if hint else logging.INFO, "%d shard(s) of up to %d cuts feed at most %d training "
            "stream(s): world size x data.num_workers must stay <= %d%s", num_shards, shard_size, num_shards,
            num_shards, hint)
    return {"out_dir": str(out_dir), "num_shards": num_shards, "max_streams": num_shards, "num_cuts": num_cuts,
            "num_failed": len(failed), "failed": failed[:20]}
