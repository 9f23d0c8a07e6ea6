"""Data path: padding of the batches and loading speed per worker; prints one JSON object.

  python benchmarks/dataloader.py [--cuts 50000] [--batch-duration 600] [--files 300]

Padding (padded frames / total frames) on a LibriSpeech-like duration mix (mean about 12 s, 1-35 s) of
cuts without audio: ``padding_no_bucketing`` (lhotse's DynamicCutSampler), ``padding_30_bins``
(DynamicBucketingSampler on 30 estimated bins, ``data.batch_duration``) and ``padding_calibrated``
(per-bucket batch sizes, here sized for a memory cost linear in duration, as ``prepare.py calibrate``
gives for a budget). ``audio_s_per_s_per_worker``: NestDataset (load 16 kHz FLAC, mix noise with
prob 0.5 as NeMo's defaults, collate) in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from lhotse import CutSet, MonoCut, Recording
from lhotse.audio import AudioSource
from lhotse.dataset.sampling import DynamicCutSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.prepare import librispeech_like_durations  # noqa: E402
from cuts.bins import Bins, estimate_bins  # noqa: E402
from cuts.config import DataConfig, NoiseConfig  # noqa: E402
from cuts.dataset import NestDataset, SamplerItem  # noqa: E402
from cuts.noise import NoiseMixer  # noqa: E402
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


def bench_loading(files: int, tmp: Path, batch_duration: float) -> float:
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
    cuts = CutSet.from_cuts(r.to_cut() for r in recs)
    cfg = DataConfig(batch_duration=batch_duration, num_buckets=10, max_duration=40.0, drop_last=False)
    ds = NestDataset(16000, NoiseMixer(NoiseConfig(), noise), seed=0)
    sampler = build_sampler(cuts, cfg, train=True, seed=0)
    audio_s, t0 = 0.0, time.perf_counter()
    for index, batch_cuts in enumerate(sampler):
        batch = ds[SamplerItem(cuts=batch_cuts, index=index)]
        audio_s += batch.audio_lens.sum().item() / 16000
    return audio_s / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", type=int, default=50_000)
    ap.add_argument("--batch-duration", type=float, default=600.0)
    ap.add_argument("--files", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = bench_padding(args.cuts, args.batch_duration, tmp)
        result["audio_s_per_s_per_worker"] = round(bench_loading(args.files, tmp, 200.0), 1)
    result.update({"cuts": args.cuts, "batch_duration": args.batch_duration,
                   "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
