"""Data path: padding of the batches and loading speed per worker; prints one JSON object.

  python benchmarks/dataloader.py [--cuts 50000] [--batch-duration 600] [--files 300]

Padding (padded frames / total frames) on a LibriSpeech-like duration mix (mean about 12 s, 1-35 s) of
cuts without audio: ``padding_no_bucketing`` (lhotse's DynamicCutSampler), ``padding_30_bins``
(DynamicBucketingSampler on 30 estimated bins, ``data.batch_duration``) and ``padding_calibrated``
(per-bucket batch sizes, here sized for a memory cost linear in duration, as ``prepare.py calibrate``
gives for a budget).

Loading speed per worker, measured as DataLoader workers run (one process, one torch thread), on the
same batches of generated 16 kHz FLAC files, in one run: ``raw_decode_audio_s_per_s`` decodes the clean
audio of each cut with soundfile and nothing else; ``audio_s_per_s_per_worker`` is NestDataset as it is
(``__getitem__``: mix noise with NeMo's defaults, load each utterance once per batch through
``cuts.noise.load_batch_audio`` reading only the noise spans used, collate); ``dataset_read_timeout`` the same
with ``data.read_timeout`` on (each read handed to a watchdog thread); ``loader_only`` without ``collate``
(padding into the batch tensors). ``*_vs_raw_decode``: their ratios to the raw decode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from lhotse import CutSet, MonoCut, Recording
from lhotse.audio import AudioSource
from lhotse.dataset.sampling import DynamicCutSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.prepare import librispeech_like_durations  # noqa: E402
from cuts.bins import Bins, estimate_bins  # noqa: E402
from cuts.config import DataConfig, NoiseConfig  # noqa: E402
from cuts.dataset import NestDataset, SamplerItem, at_rate, batch_seed, keep_freed_memory, load_mono  # noqa: E402
from cuts.noise import NoiseMixer, load_batch_audio  # noqa: E402
from cuts.sampler import build_sampler  # noqa: E402


def fake_cuts(n: int) -> CutSet:
    cuts = []
    for i, d in enumerate(librispeech_like_durations(n)):
        d = round(float(d), 3)
        rec = Recording(id=f"r{i}", sources=[AudioSource(type="file", channels=[0], source="/none")],
                        sampling_rate=16000, num_samples=int(d * 16000), duration=d)
        cuts.append(MonoCut(id=f"c{i}", start=0.0, duration=d, channel=0, recording=rec))
    return CutSet.from_cuts(cuts)


def padding(batches) -> float:
    padded = total = 0.0
    for batch in batches:
        durs = [c.duration for c in batch]
        total += len(durs) * max(durs)
        padded += len(durs) * max(durs) - sum(durs)
    return padded / total


def bench_padding(n: int, batch_duration: float, tmp: Path) -> dict:
    cuts = fake_cuts(n)
    plain = DynamicCutSampler(cuts, max_duration=batch_duration, shuffle=True, seed=0)
    bins, _ = estimate_bins(cuts, 30)
    cfg = DataConfig(batch_duration=batch_duration, max_duration=40.0, min_duration=0.5, drop_last=False)
    bucketed = build_sampler(cuts, cfg, train=True, seed=0, bins=bins)
    # Per-bucket sizes for a memory cost linear in (padded) duration: what the calibration finds for such a model.
    sizes = [max(1, int(batch_duration // upper)) for upper in bins.upper]
    (tmp / "sizes.yaml").write_text(json.dumps({"bucket_upper_duration": bins.upper, "batch_sizes": sizes}))
    cfg_cal = DataConfig(bucket_batch_size=str(tmp / "sizes.yaml"), max_duration=40.0, min_duration=0.5, drop_last=False)
    calibrated = build_sampler(cuts, cfg_cal, train=True, seed=0, bins=bins)
    return {
        "padding_no_bucketing": round(padding(plain), 4),
        "padding_30_bins": round(padding(bucketed), 4),
        "padding_calibrated": round(padding(calibrated), 4),
    }


def make_files(files: int, tmp: Path) -> tuple[CutSet, list]:
    rng = np.random.default_rng(0)
    recs = []
    for i, d in enumerate(np.clip(librispeech_like_durations(files, seed=1), 1.0, 35.0)):
        path = tmp / f"u{i:04d}.flac"
        sf.write(path, (0.1 * rng.standard_normal(int(d * 16000))).astype(np.float32), 16000)
        recs.append(Recording.from_file(path))
    noise = []
    for i in range(20):
        path = tmp / f"n{i:02d}.flac"
        sf.write(path, (0.05 * rng.standard_normal(10 * 16000)).astype(np.float32), 16000)
        noise.append(Recording.from_file(path).to_cut())
    return CutSet.from_cuts(r.to_cut() for r in recs), noise


def load_batch_waveforms(ds: NestDataset, item: SamplerItem) -> tuple[list, list]:
    """The cuts of a batch, mixed as NestDataset mixes them, and their (clean, noise) or Exception."""
    cuts = [at_rate(c, ds.sample_rate) for c in item.cuts]
    cuts = ds.mixer(cuts, random.Random(batch_seed(ds.seed, item)))
    return cuts, load_batch_audio(cuts, load_mono, ds.mixer.cfg.snr_definition)


def raw_decode(item: SamplerItem) -> float:
    """Seconds of audio decoded: the clean audio of each cut, soundfile only."""
    total = 0
    for cut in item.cuts:
        audio, sr = sf.read(cut.recording.sources[0].source, dtype="float32")
        total += len(audio) / sr
    return total


def bench_loading(files: int, tmp: Path, batch_duration: float, rounds: int) -> dict:
    torch.set_num_threads(1)  # as in a DataLoader worker
    keep_freed_memory()  # as the training's worker_init_fn does
    cuts, noise = make_files(files, tmp)
    cfg = DataConfig(batch_duration=batch_duration, num_buckets=10, max_duration=40.0, drop_last=False)
    ds = NestDataset(16000, NoiseMixer(NoiseConfig(), noise), seed=0)
    timed = NestDataset(16000, NoiseMixer(NoiseConfig(), noise), seed=0, read_timeout=60.0)  # data.read_timeout
    items = [SamplerItem(cuts=b, index=i) for i, b in enumerate(build_sampler(cuts, cfg, train=True, seed=0))]
    audio_s = sum(c.duration for item in items for c in item.cuts)
    paths = {
        "raw_decode": raw_decode,
        "dataset": lambda item: ds[item],
        "dataset_read_timeout": lambda item: timed[item],
        "loader_only": lambda item: load_batch_waveforms(ds, item),
    }
    best = {name: float("inf") for name in paths}
    for _ in range(rounds):  # interleaved, best of rounds: the machine is shared
        for name, fn in paths.items():
            t0 = time.perf_counter()
            for item in items:
                fn(item)
            best[name] = min(best[name], time.perf_counter() - t0)
    speed = {name: audio_s / t for name, t in best.items()}
    return {
        "raw_decode_audio_s_per_s": round(speed["raw_decode"], 1),
        "audio_s_per_s_per_worker": round(speed["dataset"], 1),
        "dataset_vs_raw_decode": round(speed["dataset"] / speed["raw_decode"], 3),
        "dataset_read_timeout_vs_raw_decode": round(speed["dataset_read_timeout"] / speed["raw_decode"], 3),
        "loader_only_vs_raw_decode": round(speed["loader_only"] / speed["raw_decode"], 3),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", type=int, default=50_000)
    ap.add_argument("--batch-duration", type=float, default=600.0)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-padding", action="store_true", help="only the loading speed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {} if args.skip_padding else bench_padding(args.cuts, args.batch_duration, tmp)
        result.update(bench_loading(args.files, tmp, 200.0, args.rounds))
    result.update({"cuts": args.cuts, "batch_duration": args.batch_duration,
                   "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%d")})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
