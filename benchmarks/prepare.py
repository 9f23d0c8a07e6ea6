"""Prepare-stage speed and memory; prints one JSON object.

  python benchmarks/prepare.py [--files 2000] [--jobs 2] [--cuts 1000000] [--compare-with /path/to/other/checkout]

``files_per_s``: ``prepare.py audio-dir`` (header + full decode check) over generated 16 kHz FLAC files of
2-6 s in speaker folders with repeated names.

Then, on a generated Lhotse manifest of ``--cuts`` cuts (LibriSpeech-like durations, ids with "/", fake
recordings: no audio behind them, so the audio check is replaced by a pass-through in the child process),
each command runs as its own process and reports its wall time and peak resident memory:
``manifest`` (``prepare.py manifest``: check, shuffle, duplicates, summary), ``split`` (``--dev-fraction
0.01``), ``bins`` (30 buckets + PNG) and ``report`` (one epoch of the training sampler, 600 s batches).
``--nemo-lines``: ``prepare.py nemo-manifest`` over that many segment lines (1 s each, 5 ms apart) of
200 generated 30 s FLAC files, each file checked once for its run of lines.
``--compare-with`` runs the same commands from another checkout (e.g. the main branch) in the same run,
for ratios measured side by side; commands that checkout lacks report their error.
``seconds`` is wall time, ``cpu_seconds`` the process's CPU time (steadier on a shared machine);
``peak_rss_mib`` is the process's peak; ``rss_after_imports_mib`` its size before the command ran
(Python, torch and lhotse), so their difference is what the command itself held.
A count of 0 skips that part.
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
import cuts.report, cuts.split  # imported before the count, as the commands would
rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
imported = rss()
cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t0 = time.perf_counter()
rc = main(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_SELF)
print("BENCH " + json.dumps({"rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                             "cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu0, 1), "peak_rss_mib": rss(),
                             "rss_after_imports_mib": imported}), file=sys.stderr)
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


def write_nemo_manifest(path: Path, lines: int, tmp: Path, files: int = 200) -> None:
    """``lines`` NeMo segment lines over ``files`` generated 30 s files, consecutive per file."""
    rng = np.random.default_rng(0)
    for i in range(files):
        audio = tmp / "nemo_audio" / f"spk{i % 10}" / f"{i:04d}.flac"
        audio.parent.mkdir(parents=True, exist_ok=True)
        sf.write(audio, (0.1 * rng.standard_normal(30 * 16000)).astype(np.float32), 16000)
    per_file = -(-lines // files)
    with open(path, "w") as f:
        for n in range(lines):
            i, k = divmod(n, per_file)
            f.write(json.dumps({"audio_filepath": f"nemo_audio/spk{i % 10}/{i:04d}.flac", "offset": round(k * 0.005, 3),
                                "duration": 1.0, "text": "x"}) + "\n")


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
    ap.add_argument("--nemo-lines", type=int, default=0)
    ap.add_argument("--compare-with", type=Path, default=None, help="another checkout of this project")
    args = ap.parse_args()
    result = {"files": args.files, "jobs": args.jobs, "cuts": args.cuts, "nemo_lines": args.nemo_lines}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.files:
            result["files_per_s"] = round(bench_files(args.files, args.jobs, tmp), 1)
        checkouts = {"this": ROOT} | ({"compare_with": args.compare_with.resolve()} if args.compare_with else {})
        if args.cuts:
            manifest = tmp / "cuts.jsonl.gz"
            write_manifest(manifest, args.cuts)
            for key, checkout in checkouts.items():
                result.setdefault(key, {"checkout": str(checkout)}).update(bench_commands(checkout, manifest, tmp))
        if args.nemo_lines:
            nemo = tmp / "train.json"
            write_nemo_manifest(nemo, args.nemo_lines, tmp)
            for key, checkout in checkouts.items():
                result.setdefault(key, {"checkout": str(checkout)})["nemo_manifest"] = run_child(
                    checkout, ["nemo-manifest", str(nemo), str(tmp / checkout.name / "nemo"), "--min-duration", "0"])
    result |= {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
