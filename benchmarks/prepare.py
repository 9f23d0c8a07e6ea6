"""Prepare-stage speed and memory; prints one JSON object.

  python benchmarks/prepare.py [--files 2000] [--cuts 1000000] [--jobs 2]

``files_per_s``: ``prepare.py audio-dir`` (header + full decode check) over generated 16 kHz FLAC files
of 2-6 s. ``bins_1m_seconds`` and ``bins_1m_peak_rss_mib``: ``prepare.py bins`` over a manifest of
1,000,000 cuts without audio (LibriSpeech-like durations), run as its own process so that its peak
resident memory is its own.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuts.prepare import prepare_audio_dir  # noqa: E402


def librispeech_like_durations(n: int, seed: int = 0) -> np.ndarray:
    """Mean about 12 s, between 1 and 35 s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.gamma(shape=4.0, scale=3.0, size=n), 1.0, 35.0)


def write_manifest(path: Path, n: int) -> None:
    """n cuts as JSON lines, written directly (no audio exists behind them)."""
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i, d in enumerate(librispeech_like_durations(n)):
            d = round(float(d), 3)
            rec = {"id": f"r{i:07d}", "sources": [{"type": "file", "channels": [0], "source": f"/none/r{i:07d}.flac"}],
                   "sampling_rate": 16000, "num_samples": int(d * 16000), "duration": d, "channel_ids": [0]}
            f.write(json.dumps({"id": f"c{i:07d}", "start": 0.0, "duration": d, "channel": 0, "recording": rec,
                                "type": "MonoCut"}) + "\n")


def bench_files(n: int, jobs: int, tmp: Path) -> float:
    rng = np.random.default_rng(0)
    src = tmp / "audio"
    for i in range(n):
        path = src / f"d{i // 500}" / f"f{i:05d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        x = (0.1 * rng.standard_normal(int(rng.uniform(2, 6) * 16000))).astype(np.float32)
        sf.write(path, x, 16000)
    t0 = time.perf_counter()
    summary = prepare_audio_dir(src, tmp / "out", jobs=jobs)
    elapsed = time.perf_counter() - t0
    assert summary["num_cuts"] == n, summary
    return n / elapsed


def bench_bins(n: int, tmp: Path) -> tuple[float, float]:
    manifest = tmp / "cuts_1m.jsonl.gz"
    write_manifest(manifest, n)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "prepare.py"), "bins", str(manifest), "--buckets", "30",
                    "--out", str(tmp / "bins.yaml")], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child: prepare.py bins
    return elapsed, peak_kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--cuts", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files_per_s = bench_files(args.files, args.jobs, tmp)
        bins_s, bins_rss = bench_bins(args.cuts, tmp)
    print(json.dumps({
        "files": args.files, "jobs": args.jobs, "files_per_s": round(files_per_s, 1),
        "cuts": args.cuts, "bins_1m_seconds": round(bins_s, 1), "bins_1m_peak_rss_mib": round(bins_rss, 1),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
