"""Other inputs than audio folders: NeMo manifests, Lhotse manifests, Lhotse recipes; Shar export.

Every builder writes an output folder through SetWriter (cuts.jsonl.gz, rejected.jsonl, summary.json)
and validates audio as ``audio-dir`` does, so a bad file is reported and skipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from lhotse import CutSet, RecordingSet, SupervisionSegment, load_manifest_lazy
from lhotse.cut import Cut
from tqdm import tqdm

from cuts.prepare import (
    DURATION_TOLERANCE, Rejection, SetWriter, add_windows, check_recording, finish, parallel_map, probe,
    recording_to_cut,
)

RECIPES = ("librispeech", "mini_librispeech", "musan")


def read_nemo_lines(manifest: Path) -> list[tuple[str, dict | str]]:
    """(where, entry) per line of a NeMo JSON-lines manifest; a malformed line gives (where, reason)."""
    out = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        where = f"{manifest}:{n}"
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path = Path(entry["audio_filepath"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            out.append((where, f"bad manifest line: {type(e).__name__}: {e}"))
            continue
        entry["audio_filepath"] = str(path if path.is_absolute() else manifest.parent / path)
        out.append((where, entry))
    return out


def prepare_nemo_manifests(
    manifests: Sequence[Path], out_dir: Path, *, channel: str = "first", min_duration: float = 0.1,
    max_duration: Optional[float] = None, window: Optional[float] = None, jobs: int = 1,
) -> dict:
    """``prepare.py nemo-manifest``: NeMo manifest lines (audio_filepath, duration, offset, text) -> cuts.

    Relative paths resolve against the manifest's folder; each audio file is checked once, however
    many segments of it the manifests list.
    """
    writer = SetWriter(out_dir)
    lines = [x for m in manifests for x in read_nemo_lines(Path(m))]
    paths = sorted({e["audio_filepath"] for _, e in lines if isinstance(e, dict)})
    checked = dict(zip(paths, tqdm(parallel_map(probe, ((Path(p), 0.0) for p in paths), jobs), total=len(paths),
                                   desc="nemo-manifest")))
    for where, entry in lines:
        if isinstance(entry, str):
            writer.reject(Rejection(where, entry))
            continue
        rec = checked[entry["audio_filepath"]]
        if isinstance(rec, Rejection):
            writer.reject(Rejection(f"{where} {rec.path}", rec.reason))
            continue
        offset = float(entry.get("offset") or 0.0)
        duration = float(entry["duration"]) if entry.get("duration") is not None else rec.duration - offset
        if offset + duration > rec.duration + DURATION_TOLERANCE:
            writer.reject(Rejection(where, f"segment {offset:.2f}+{duration:.2f} s runs past the end ({rec.duration:.2f} s)"))
            continue
        if duration < min_duration:
            writer.reject(Rejection(where, f"too short: {duration:.3f} s < --min-duration {min_duration} s"))
            continue
        whole = recording_to_cut(rec, channel)
        cut_id = rec.id if offset == 0 and abs(duration - rec.duration) < DURATION_TOLERANCE else \
            f"{rec.id}-{round(offset * 1000):08d}-{round(duration * 1000):08d}"
        cut = whole.truncate(offset=offset, duration=min(duration, rec.duration - offset)).with_id(cut_id)
        if entry.get("text") is not None:
            cut.supervisions = [SupervisionSegment(id=cut_id, recording_id=rec.id, start=0.0,
                                                   duration=cut.duration, text=str(entry["text"]))]
        add_windows(writer, cut, where, min_duration, max_duration, window)
    return finish(writer, ", ".join(map(str, manifests)))


def _check_star(rec, source, min_duration):
    return check_recording(rec, source, min_duration)


def write_validated(
    writer: SetWriter, cuts: Sequence[Cut], *, min_duration: float, max_duration: Optional[float],
    window: Optional[float], jobs: int, desc: str,
) -> None:
    """Check each distinct recording of ``cuts`` once (in parallel), then write the cuts of good ones."""
    recs = {c.recording.id: c.recording for c in cuts if c.has_recording}
    ids = sorted(recs)
    results = dict(zip(ids, tqdm(parallel_map(_check_star, ((recs[i], i, 0.0) for i in ids), jobs),
                                 total=len(ids), desc=desc)))
    for cut in cuts:
        result = results.get(cut.recording.id) if cut.has_recording else Rejection(cut.id, "no recording")
        source = str(cut.recording.sources[0].source) if cut.has_recording else cut.id
        if isinstance(result, Rejection):
            writer.reject(Rejection(source, result.reason))
        elif cut.duration < min_duration:
            writer.reject(Rejection(source, f"too short: {cut.duration:.3f} s < --min-duration {min_duration} s"))
        else:
            add_windows(writer, cut, source, min_duration, max_duration, window)


def prepare_lhotse_manifest(
    manifests: Sequence[Path], out_dir: Path, *, channel: str = "first", min_duration: float = 0.1,
    max_duration: Optional[float] = None, window: Optional[float] = None, jobs: int = 1,
) -> dict:
    """``prepare.py manifest``: existing Lhotse CutSet or RecordingSet manifests -> checked cuts."""
    writer = SetWriter(out_dir)
    cuts: list[Cut] = []
    for m in manifests:
        manifest = load_manifest_lazy(m)
        if isinstance(manifest, RecordingSet):
            cuts.extend(recording_to_cut(r, channel) for r in manifest)
        elif isinstance(manifest, CutSet):
            cuts.extend(manifest)
        else:
            raise ValueError(f"{m}: a CutSet or RecordingSet manifest is needed, not {type(manifest).__name__}")
    write_validated(writer, cuts, min_duration=min_duration, max_duration=max_duration, window=window, jobs=jobs,
                    desc="manifest")
    return finish(writer, ", ".join(map(str, manifests)))


def recipe_cuts(corpus: str, corpus_dir: Path, download: bool, parts: Optional[Sequence[str]]) -> list[Cut]:
    """Cuts of a corpus through Lhotse's recipe (downloading only when asked)."""
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
    cuts: list[Cut] = []
    for part in sorted(manifests):
        m = manifests[part]
        cuts.extend(CutSet.from_manifests(recordings=m["recordings"], supervisions=m.get("supervisions")))
    return cuts


def prepare_recipe(
    corpus: str, corpus_dir: Path, out_dir: Path, *, download: bool = False, parts: Optional[Sequence[str]] = None,
    min_duration: float = 0.1, max_duration: Optional[float] = None, window: Optional[float] = None, jobs: int = 1,
) -> dict:
    """``prepare.py recipe``: LibriSpeech (all parts, mini too) or MUSAN (music, speech, noise) -> checked cuts."""
    if not download and not Path(corpus_dir).is_dir():
        raise FileNotFoundError(f"{corpus_dir} does not exist; pass --download to fetch {corpus}")
    writer = SetWriter(out_dir)
    write_validated(writer, recipe_cuts(corpus, Path(corpus_dir), download, parts), min_duration=min_duration,
                    max_duration=max_duration, window=window, jobs=jobs, desc=corpus)
    return finish(writer, f"{corpus} at {corpus_dir}")


def export_shar(cuts_path: Path, out_dir: Path, shard_size: int = 1000) -> dict:
    """``prepare.py shar``: a CutSet with its audio as FLAC in Lhotse Shar shards (for object storage)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuts = CutSet.from_jsonl_lazy(cuts_path)
    shards = cuts.to_shar(out_dir, fields={"recording": "flac"}, shard_size=shard_size)
    return {"out_dir": str(out_dir), "num_shards": len(shards["cuts"])}

