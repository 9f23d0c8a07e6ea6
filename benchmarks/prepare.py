"""Prepare-stage speed and memory; prints one JSON object.

  python benchmarks/prepare.py [--files 2000] [--jobs 2] [--cuts 1000000] [--compare-with /path/to/other/checkout]

``files_per_s``: ``prepare.py audio-dir`` (header + full decode check) over generated 16 kHz FLAC files of
2-6 s in speaker folders with repeated names.

Then, on a generated Lhotse manifest of ``--cuts`` cuts (LibriSpeech-like durations, ids with "/", fake
recordings: no audio behind them, so the audio check is replaced by a pass-through in the child process),
each command runs as its own process and reports its wall time and peak resident memory:
``manifest`` (``prepare.py manifest``: check, shuffle, duplicates, summary), ``split`` (``--dev-fraction
0.01``), ``bins`` (30 buckets + PNG) and ``report`` (one epoch of the training sampler, 600 s batches).
``--compare-with`` runs the same commands from another checkout (e.g. the main branch) in the same run,
for ratios measured side by side; commands that checkout lacks are left out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
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

# Runs cuts.cli.main(argv) of the checkout at argv[1], with the audio check passed through, and
# reports its wall time and peak RSS on stderr as the last line.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import cuts.sources
cuts.sources.check_recording = lambda rec, source, min_duration, check_audio=True: rec
from cuts.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[2:])
print("BENCH " + json.dumps({"rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}),
      file=sys.stderr)
"""


def librispeech_like_durations(n: int, seed: int = 0) -> np.ndarray:
    """Mean about 12 s, between 1 and 35 s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.gamma(shape=4.0, scale=3.0, size=n), 1.0, 35.0)


def write_manifest(path: Path, n: int) -> None:
    """n cuts as JSON lines, written directly (no audio exists behind them), in speaker folders."""
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i, d in enumerate(librispeech_like_durations(n)):
            d = round(float(d), 3)
            rid = f"spk{i % 1000:03d}/{i:07d}"
            rec = {"id": rid, "sources": [{"type": "file", "channels": [0], "source": f"/none/{rid}.flac"}],
                   "sampling_rate": 16000, "num_samples": int(d * 16000), "duration": d, "channel_ids": [0]}
            f.write(json.dumps({"id": rid, "start": 0.0, "duration": d, "channel": 0, "recording": rec,
                                "type": "MonoCut"}) + "\n")


def bench_files(n: int, jobs: int, tmp: Path) -> float:
    rng = np.random.default_rng(0)
    src = tmp / "audio"
    for i in range(n):
        path = src / f"spk{i // 100:03d}" / f"{i % 100:03d}.flac"  # the same names in every folder
        path.parent.mkdir(parents=True, exist_ok=True)
        x = (0.1 * rng.standard_normal(int(rng.uniform(2, 6) * 16000))).astype(np.float32)
        sf.write(path, x, 16000)
    t0 = time.perf_counter()
    summary = prepare_audio_dir(src, tmp / "out", jobs=jobs)
    elapsed = time.perf_counter() - t0
    assert summary["num_cuts"] == n, summary
    return n / elapsed


def run_child(checkout: Path, argv: list[str]) -> dict:
    """One prepare.py command of ``checkout`` in its own process: its seconds and peak RSS (MiB)."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(checkout), *argv], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(checkout)))
    last = [x for x in result.stderr.splitlines() if x.startswith("BENCH ")]
    if result.returncode != 0 or not last:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(last[-1][6:])


def bench_commands(checkout: Path, manifest: Path, tmp: Path) -> dict:
    out = tmp / checkout.name
    commands = {
        "manifest": ["manifest", str(manifest), str(out / "all"), "--min-duration", "0"],
        "split": ["split", str(out / "all" / "cuts.jsonl.gz"), str(out), "--dev-fraction", "0.01"],
        "bins": ["bins", str(out / "all" / "cuts.jsonl.gz"), "--buckets", "30", "--out", str(out / "bins.yaml")],
        "report": ["report", str(out / "all" / "cuts.jsonl.gz"), "--bins", str(out / "bins.yaml"),
                   "--batch-duration", "600", "--png", str(out / "report.png")],
    }
    return {name: run_child(checkout, argv) for name, argv in commands.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cuts", type=int, default=1_000_000)
    ap.add_argument("--compare-with", type=Path, default=None, help="another checkout of this project")
    args = ap.parse_args()
    result = {"files": args.files, "jobs": args.jobs, "cuts": args.cuts}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.files:
            result["files_per_s"] = round(bench_files(args.files, args.jobs, tmp), 1)
        manifest = tmp / "cuts.jsonl.gz"
        write_manifest(manifest, args.cuts)
        result["this"] = bench_commands(ROOT, manifest, tmp)
        if args.compare_with:
            result["compare_with"] = {"checkout": str(args.compare_with),
                                      **bench_commands(args.compare_with.resolve(), manifest, tmp)}
    result |= {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
