"""Start-up checks of the sets a run reads (part of nest.training.preflight): each error names the key and the
file, and says what to run."""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from cuts.io import cut_short, iter_jsonl
from cuts.prepare import AUDIO_EXTENSIONS
from cuts.sampler import open_cuts
from cuts.shar import is_url
from cuts.targets import targets_spec
from nest.config.schema import RunConfig
from nest.errors import ConfigError


def _first_json(path: Path) -> dict | None:
    """The first object of a JSON-lines file (plain or gzip), or None when its first line is not one."""
    try:
        return next((obj for _, obj in iter_jsonl(path)), None)
    except (OSError, ValueError):  # ManifestError is a ValueError
        return None


def _hint(key: str, source: str) -> str | None:
    """Why ``source`` is not a CutSet this run can read, and the prepare command (``nest-prepare``, or
    ``python prepare.py`` in the repository) that makes one."""
    p = Path(source)
    make = "nest-prepare noise" if key == "data.noise_cuts" else "nest-prepare audio-dir"
    if p.is_dir():
        if any(p.glob("cuts.*.jsonl*")):
            return None
        if (p / "cuts.jsonl.gz").is_file():
            return f"{key}: {source} is a prepared folder: give the manifest in it, {p / 'cuts.jsonl.gz'}"
        if (p / "train.jsonl.gz").is_file():
            return f"{key}: {source} holds a split: give {p / 'train.jsonl.gz'} (and {p / 'dev.jsonl.gz'} as data.val_cuts)"
        has_audio = any(q.suffix.lower() in AUDIO_EXTENSIONS for q in islice(p.rglob("*"), 10000))
        what = "an audio folder" if has_audio else "a folder without a Shar cuts.*.jsonl.gz"
        return f"{key}: {source} is {what}, not a CutSet: run `{make} {source} OUT` and give OUT/cuts.jsonl.gz"
    if p.suffix.lower() in AUDIO_EXTENSIONS:
        return f"{key}: {source} is an audio file: give a CutSet (`{make} FOLDER OUT`)"
    first = _first_json(p)
    if first is None:
        return None
    if "audio_filepath" in first:
        return (f"{key}: {source} is a NeMo manifest: run `nest-prepare nemo-manifest {source} OUT` and give "
                f"OUT/cuts.jsonl.gz")
    if "sources" in first and "recording" not in first:
        return f"{key}: {source} is a RecordingSet: run `nest-prepare manifest {source} OUT` and give OUT/cuts.jsonl.gz"
    if "supervisions" not in first and "recording" not in first and "tracks" not in first:
        return f"{key}: {source} is not a CutSet manifest (first line: {json.dumps(first)[:120]})"
    return None


def audio_paths(cut) -> list[str]:
    """The audio files a cut reads (its recording's file sources; a MixedCut's tracks' too)."""
    if hasattr(cut, "tracks"):
        return [p for t in cut.tracks for p in audio_paths(t.cut)]
    recording = getattr(cut, "recording", None)
    return [s.source for s in recording.sources if s.type == "file"] if recording is not None else []


def check_sources(cfg: RunConfig) -> None:
    """Each of data.train_cuts, val_cuts and noise_cuts exists, is a CutSet (or Shar folder) and holds cuts."""
    d = cfg.data
    for key, sources in (("data.train_cuts", d.train_cuts), ("data.val_cuts", d.val_cuts),
                         ("data.noise_cuts", d.noise_cuts)):
        for s in sources:
            if not is_url(s) and not Path(s).exists():
                raise ConfigError(f"{key}: {s} does not exist")
            if not is_url(s):
                hint = _hint(key, s)
                if hint:
                    raise ConfigError(hint)
                damage = cut_short(s) if Path(s).is_file() and not s.endswith(".json") else None  # not a JSON array
                if damage:  # training would stop reading it there, every epoch
                    raise ConfigError(f"{key}: {damage} (with the command that made it)")
            try:
                first = next(iter(open_cuts(s, cfg.seed)), None)
            except Exception as e:
                raise ConfigError(f"{key}: {s} is not a readable CutSet ({type(e).__name__}: {e})") from None
            if first is None:
                raise ConfigError(f"{key}: {s} holds no cuts")
            relative = next((p for p in audio_paths(first) if not Path(p).is_absolute()), None)
            if relative is not None:
                raise ConfigError(
                    f"{key}: {s} names its audio by relative paths (such as {relative}), which every worker and node "
                    f"would resolve against its own current folder: run `nest-prepare manifest {s} OUT` (it stores "
                    f"them absolute) and give OUT/cuts.jsonl.gz")
            if cfg.model.targets == "kmeans" and key != "data.noise_cuts":
                check_targets(cfg, key, s, first)


def check_targets(cfg: RunConfig, key: str, source: str, cut) -> None:
    """model.targets=kmeans: the cuts carry labels that fit the model's decoder and token rate."""
    try:
        spec = targets_spec(cut)
    except KeyError as e:
        raise ConfigError(f"{key}: {source}: {e.args[0]}") from None
    q, enc, pre = cfg.model.quantizer, cfg.model.encoder, cfg.model.preprocessor
    shift = enc.subsampling_factor * pre.window_stride
    for what, theirs, ours, fix in (
        ("clusters", spec.num_classes, q.num_classes, "model.quantizer.num_classes"),
        ("labels per token", spec.labels_per_token, q.num_books, "model.quantizer.num_books"),
    ):
        if theirs != ours:
            raise ConfigError(f"{key}: the k-means labels of {source} have {theirs} {what} but {fix}={ours}: "
                              f"set {fix}={theirs}")
    if abs(spec.token_shift - shift) > 1e-6:
        raise ConfigError(f"{key}: the labels of {source} are {spec.token_shift * 1000:g} ms apart but the encoder "
                          f"makes a token every {shift * 1000:g} ms: label with this model's configuration")
