"""What the probe reads: frozen feature sources, labels from cuts, pooled features and their cache.

A source is ``random:CONFIG``, ``mel[:CONFIG]`` or a checkpoint file (ours or ``.nemo``); it maps audio
(B, S) to one (B, D, T') tensor per layer. Each cut's frames are mean-pooled per layer; with a cache
folder the frames are also written as Lhotse arrays (``nest.extract --format lhotse``'s layout:
``cuts_with_features.jsonl.gz`` whose cuts carry a TemporalArray ``layer_{i}`` per layer), keyed by the
source, the cuts manifest and the layers, and read back instead of running the source again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torchaudio
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.features.io import NumpyFilesWriter
from lhotse.shar.utils import to_shar_placeholder
from lhotse.utils import fastcopy
from torch import nn

from cuts.console import error_line
from cuts.dataset import at_rate, load_mono
from cuts.io import sha256_file
from nest.config.load import load_model_config, open_manifest
from nest.errors import CheckpointError, ConfigError, ProbeError
from nest.io.checkpoint import load_model
from nest.io.torch_file import torch_file_problem
from nest.model.features import PreprocessorConfig
from nest.objectives import build_model
from nest.objectives.base import select_layers

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SUPERVISION_FIELDS = ("speaker", "language", "text", "gender")
CKPT_KINDS = "our .ckpt/.pt checkpoint, a NeMo .nemo file, random:CONFIG.yaml, or mel[:CONFIG.yaml]"


def pool(frames: np.ndarray) -> np.ndarray:
    """(T', D) features of one cut's valid frames -> (D,) mean, accumulated in float64."""
    return frames.mean(0, dtype=np.float64).astype(np.float32)


class EncoderLayers(nn.Module):
    """A model's front end and encoder, frozen: audio (B, S), lens -> [(B, D, T')] per layer, lens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.num_layers = model.cfg.encoder.n_layers
        self.sample_rate = model.cfg.preprocessor.sample_rate
        self.frame_shift = model.cfg.encoder.subsampling_factor * model.cfg.preprocessor.window_stride

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        _, lens, hidden = self.model.encode(audio, audio_lens, return_layers=True)
        return hidden, lens


class LogMelLayers(nn.Module):
    """Log-mel frames as one "layer". Not normalised per utterance: that would make every mean zero."""

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        self.num_layers = 1
        self.sample_rate = cfg.sample_rate
        self.frame_shift = cfg.window_stride
        self.hop = int(cfg.window_stride * cfg.sample_rate)
        self.guard = cfg.log_zero_guard_value
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=int(cfg.window_size * cfg.sample_rate),
            hop_length=self.hop, n_mels=cfg.features, norm="slaney", mel_scale="slaney",
        )

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        # One cut at a time, so that a cut's frames never see another cut's padding.
        mels = [torch.log(self.mel(audio[b, : int(n)]) + self.guard) for b, n in enumerate(audio_lens)]
        lens = torch.tensor([m.shape[-1] for m in mels])
        out = torch.zeros(len(mels), mels[0].shape[0], int(lens.max()))  # (B, M, T)
        for b, m in enumerate(mels):
            out[b, :, : m.shape[-1]] = m
        return [out], lens


def _model_config(config_path: str, spec: str):
    """The model section of a config file, its errors reported against ``spec``."""
    try:
        return load_model_config(config_path)
    except ConfigError as e:
        raise ProbeError(f"{spec}: {e}") from None


def source_identity(spec: str, seed: int) -> dict:
    """What the features of ``spec`` depend on (a cache key), computed without building the model."""
    if spec.startswith("random:"):
        return {"kind": "random", "model": asdict(_model_config(spec[len("random:"):], spec)), "seed": seed}
    if spec == "mel" or spec.startswith("mel:"):
        cfg = _model_config(spec[4:], spec).preprocessor if spec != "mel" else PreprocessorConfig()
        return {"kind": "mel", "preprocessor": asdict(cfg)}
    return {"kind": "file", "sha256": sha256_file(checked_file(spec))}


def checked_file(spec: str) -> Path:
    """The checkpoint file named by ``spec``, refused early when it is missing or of an unknown kind."""
    path = Path(spec)
    if not path.is_file():
        prefix = spec.split(":", 1)[0]
        if ":" in spec and not Path(prefix).exists():
            raise ProbeError(f"checkpoint {spec!r}: unknown kind {prefix + ':'!r}; give {CKPT_KINDS}")
        raise ProbeError(f"checkpoint {spec}: no such file; give {CKPT_KINDS}")
    problem = None if path.suffix == ".nemo" else torch_file_problem(path)
    if problem:  # empty, cut short, or another kind of file: said as every command says it
        raise ProbeError(f"checkpoint {spec}: not a readable PyTorch checkpoint: {problem}; give {CKPT_KINDS}")
    return path


def load_source(spec: str, seed: int) -> nn.Module:
    """The frozen feature source named by ``spec`` (see the module docstring)."""
    if spec.startswith("random:"):
        cfg = _model_config(spec[len("random:"):], spec)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # as train.py seeds before building the model: its step-0 weights
            return EncoderLayers(build_model(cfg))
    if spec == "mel" or spec.startswith("mel:"):
        return LogMelLayers(_model_config(spec[4:], spec).preprocessor if spec != "mel" else PreprocessorConfig())
    try:
        return EncoderLayers(load_model(checked_file(spec)))
    except (CheckpointError, ConfigError) as e:
        raise ProbeError(f"checkpoint {spec}: cannot be probed: {e}") from None


def label_of(cut: Cut, key: str) -> Optional[str]:
    """The label ``key`` of a cut: its first supervision's field or custom key, else the cut's custom key;
    ``folder:N``: the N-th folder of the cut's id (``prepare.py audio-dir`` makes ids from paths, so
    ``folder:-1`` of ``sessionA/spk1/001`` is the speaker folder ``spk1``); ``re:REGEX``: the first group of
    the regular expression searched in the cut's id (the whole match without a group), e.g. ``re:^(\\d)_``
    for the digit of ``7_george_12``."""
    if key.startswith("re:"):
        match = id_pattern(key).search(cut.id)
        return None if match is None else match.group(1 if match.re.groups else 0)
    if key.startswith("folder:"):
        folders = cut.id.split("/")[:-1]
        try:
            return folders[int(key[len("folder:"):])]
        except (ValueError, IndexError):
            return None
    values = []
    if cut.supervisions:
        sup = cut.supervisions[0]
        if key in SUPERVISION_FIELDS:
            values.append(getattr(sup, key))
        values.append((sup.custom or {}).get(key))
    values.append((getattr(cut, "custom", None) or {}).get(key))
    value = next((v for v in values if v is not None), None)
    if value is not None and not isinstance(value, (str, int, bool, float)):
        raise ProbeError(f"cut {cut.id}: field {key!r} holds a {type(value).__name__}, not a label")
    return None if value is None else str(value)


def id_pattern(key: str) -> re.Pattern:
    """The compiled regular expression of a ``re:REGEX`` label (re caches compiled patterns)."""
    try:
        return re.compile(key[len("re:"):])
    except re.error as e:
        raise ProbeError(f"--label {key}: not a regular expression ({e}); e.g. --label 're:^(\\d)_' takes the "
                         f"digit that starts the cut id") from None


def available_keys(cut: Cut) -> list[str]:
    """The label fields a cut has, for the message of a missing one."""
    keys = set((getattr(cut, "custom", None) or {}).keys())
    if cut.supervisions:
        sup = cut.supervisions[0]
        keys |= {k for k in SUPERVISION_FIELDS if getattr(sup, k) is not None} | set((sup.custom or {}).keys())
    return sorted(keys)


def read_labels(cuts: CutSet, key: str, where: str) -> dict[str, str]:
    """Cut id -> label, reading the manifest only (no audio): bad labels fail before any encoder runs."""
    labels = {}
    if key.startswith("re:"):
        id_pattern(key)  # a bad expression is named before any cut is read
    for cut in cuts:
        label = label_of(cut, key)
        if label is None and key.startswith("re:"):
            raise ProbeError(f"{where}: the id of cut {cut.id} does not match --label {key}: fix the expression, "
                             f"or filter the cuts it should not see")
        if label is None:
            raise ProbeError(
                f"{where}: cut {cut.id} has no label {key!r} (looked at its first supervision's fields and "
                f"custom keys, and the cut's custom keys); it has: {', '.join(available_keys(cut)) or 'nothing'}")
        labels[cut.id] = label
    if not labels:
        raise ProbeError(f"{where}: no cuts")
    return labels


@dataclass
class FeatureSet:
    """Pooled features of one split: ids, labels, (N, L, D) and the cuts whose audio failed."""

    ids: list[str]
    labels: list[str]
    pooled: torch.Tensor  # (N, L, D) float32
    layers: list[int]
    failed: list[str] = field(default_factory=list)


def iter_layer_frames(
    source: nn.Module, cuts: CutSet, layers: list[int], batch_size: int, device: torch.device, failed: list[str]
) -> Iterator[tuple[Cut, list[np.ndarray]]]:
    """Each cut with one (T', D) float32 array per chosen layer; a cut whose audio fails is logged, skipped."""
    batch: list[tuple[Cut, np.ndarray]] = []

    def flush():
        audio_list = [torch.from_numpy(a) for _, a in batch]
        lens = torch.tensor([len(a) for a in audio_list])
        audio = nn.utils.rnn.pad_sequence(audio_list, batch_first=True).to(device)
        hidden, out_lens = source(audio, lens.to(device))
        for b, (cut, _) in enumerate(batch):
            n = int(out_lens[b])
            yield cut, [hidden[i][b, :, :n].T.float().cpu().numpy() for i in layers]  # (T', D) each
        batch.clear()

    for cut in cuts:
        try:
            batch.append((cut, load_mono(at_rate(cut, source.sample_rate))))
        except Exception as e:
            log.warning("skipping cut %s: audio failed to load (%s)", cut.id, error_line(e))
            failed.append(cut.id)
            continue
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def compute_features(
    source: nn.Module, cuts: CutSet, layers: list[int], labels: dict[str, str], batch_size: int,
    device: torch.device, cache_dir: Optional[Path] = None,
) -> FeatureSet:
    """Pool every cut's layers; with ``cache_dir``, also store the frames as Lhotse arrays and cuts."""
    writer = cut_writer = None
    if cache_dir is not None:
        writer = NumpyFilesWriter(cache_dir / "arrays")
        cut_writer = CutSet.open_writer(cache_dir / "cuts_with_features.jsonl.gz", overwrite=True)
    ids, pooled, failed = [], [], []
    for cut, frames in iter_layer_frames(source, cuts, layers, batch_size, device, failed):
        ids.append(cut.id)
        pooled.append(np.stack([pool(f) for f in frames]))
        if writer is not None:
            for i, f in zip(layers, frames):
                # Lhotse's file writer takes flat names: a cut id such as spk1/001 is quoted (as nest.extract).
                key = f"{urllib.parse.quote(cut.id, safe='')}-layer{i}"
                cut = cut.with_custom(f"layer_{i}", writer.store_array(key, f, frame_shift=source.frame_shift,
                                                                        temporal_dim=0))
            if cut.has_recording and any(src.type == "memory" for src in cut.recording.sources):
                cut = fastcopy(cut, recording=to_shar_placeholder(cut.recording, cut))  # audio stays in its shards
            cut_writer.write(cut)
    if cut_writer is not None:
        cut_writer.close()
    return finish(ids, pooled, labels, layers, failed)


def finish(ids, pooled, labels, layers, failed) -> FeatureSet:
    """A FeatureSet from per-cut pooled arrays; nothing loaded at all is an error."""
    if not ids:
        raise ProbeError(f"no cut could be loaded ({len(failed)} failed, e.g. {failed[:3]})")
    return FeatureSet(ids, [labels[i] for i in ids], torch.from_numpy(np.stack(pooled)), layers, failed)


def read_cached(cache_dir: Path, labels: dict[str, str]) -> FeatureSet:
    """Pooled features from a cache written by ``compute_features`` (the same pooling, the same numbers)."""
    meta = json.loads((cache_dir / "meta.json").read_text())
    layers = meta["layers"]
    ids, pooled = [], []
    for cut in CutSet.from_jsonl_lazy(cache_dir / "cuts_with_features.jsonl.gz"):
        ids.append(cut.id)
        # The array as stored: cut.load_custom would trim it to duration / frame_shift frames, and the
        # encoder makes one frame more than that for many durations.
        pooled.append(np.stack([pool(cut.custom[f"layer_{i}"].load()) for i in layers]))
    return finish(ids, pooled, labels, layers, meta["failed"])


def cache_key(identity: dict, manifest: str, layers: str, batch_size: int) -> str:
    """What one split's features depend on: the source, the manifest's bytes, the layers and the batching."""
    path = Path(manifest)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    data = {"version": CACHE_VERSION, "source": identity, "layers": layers, "batch_size": batch_size,
            "cuts": [sha256_file(p) for p in files]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def features_for(
    spec: str, seed: int, manifests: dict[str, str], labels: dict[str, dict[str, str]], layers: str,
    batch_size: int, device: torch.device, cache: Optional[Path],
) -> tuple[dict[str, FeatureSet], dict[str, str]]:
    """Features of each split, from the cache where it holds them, else from the source (run once)."""
    identity = source_identity(spec, seed)
    out, status, source, chosen = {}, {}, None, None
    for split, manifest in manifests.items():
        cache_dir = cache / f"{split}-{cache_key(identity, manifest, layers, batch_size)}" if cache else None
        if cache_dir is not None and (cache_dir / "meta.json").is_file():
            out[split], status[split] = read_cached(cache_dir, labels[split]), "read"
            continue
        if source is None:
            source = load_source(spec, seed).to(device)
            try:
                chosen = select_layers(layers, source.num_layers)
            except ValueError as e:
                raise ProbeError(f"--layers {layers}: {e}") from None
        if cache_dir is not None and cache_dir.exists():
            shutil.rmtree(cache_dir)  # an interrupted write of ours: no meta.json
        cuts = open_manifest(manifest, f"--{split}", ProbeError)
        out[split] = compute_features(source, cuts, chosen, labels[split], batch_size, device, cache_dir)
        status[split] = "off"
        if cache_dir is not None:
            meta = {"checkpoint": spec, "cuts": manifest, "layers": chosen, "failed": out[split].failed}
            (cache_dir / "meta.json").write_text(json.dumps(meta, indent=1))  # last: the cache is complete
            status[split] = "written"
    return out, status
