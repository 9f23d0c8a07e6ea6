"""k-means targets: fit time and peak memory, labelling speed per core. Prints one JSON object.

  python benchmarks/kmeans.py [--frames 1000000] [--dims 39] [--clusters 100] [--label-seconds 20]

fit: ``nest.kmeans.fit_kmeans`` with fairseq's parameters (n_init=20, batch_size=10000, max_iter=100,
max_no_improvement=100, tol=0) on FRAMES x DIMS float32 frames drawn from a 100-component Gaussian
mixture with overlapping, unequal components (so that the fit does not stop at once), in a child
process so that its peak RSS (imports, data and fit) is its own. Goals: under 120 s and 2 GiB.

labelling: one torch thread; the real speech of ../shared/data/real (synthetic audio where absent) in
memory at 16 kHz, run through MFCC + nearest-centroid assignment + token layout for about
LABEL_SECONDS of wall time. Audio seconds per wall second on one core; goal: at least 500.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_SPEECH = ROOT.parent / "shared" / "data" / "real" / "speech"


def mixture(frames: int, dims: int, seed: int):
    """(frames, dims) float32 from 100 overlapping diagonal Gaussians with Dirichlet weights."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 3.0, (100, dims)).astype(np.float32)
    scales = rng.uniform(0.5, 3.0, (100, dims)).astype(np.float32)
    comp = rng.choice(100, size=frames, p=rng.dirichlet(np.ones(100)))
    x = np.empty((frames, dims), dtype=np.float32)
    for start in range(0, frames, 100_000):  # in chunks: no float64 copy of the whole set
        c = comp[start: start + 100_000]
        x[start: start + len(c)] = means[c] + scales[c] * rng.standard_normal((len(c), dims), dtype=np.float32)
    return x


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fit_child(frames: int, dims: int, clusters: int, threads) -> None:
    from nest.kmeans import fit_kmeans

    x = mixture(frames, dims, seed=0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), cpu_seconds()
    _, progress = fit_kmeans(x, clusters, seed=0, threads=threads)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    print(json.dumps({"fit_seconds": round(seconds, 2), "fit_cpu_seconds": round(cpu, 2), "fit_peak_rss_gib":
                      round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
                      "rss_before_fit_gib": round(rss_before / 2**30, 3), "data_gib": round(x.nbytes / 2**30, 3),
                      **progress}))


def speech_audio() -> tuple[list, str]:
    """Real speech at 16 kHz (mono float32), or synthetic speech-like audio where it is absent."""
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio

    files = sorted(p for p in REAL_SPEECH.glob("*") if p.suffix in (".wav", ".flac")) if REAL_SPEECH.is_dir() else []
    if not files:
        from cuts.synth import utterance

        rng = np.random.default_rng(0)
        return [utterance(rng, 16000, d) for d in (2.0, 3.0, 5.0, 12.0)], "synthetic"
    out = []
    for p in files:
        x, sr = sf.read(p, dtype="float32", always_2d=True)
        x = torch.from_numpy(x.mean(1))
        if sr != 16000:
            x = torchaudio.functional.resample(x, sr, 16000)
        out.append(x.numpy())
    return out, f"{len(files)} files of {REAL_SPEECH}"


def labelling_speed(clusters: int, seconds: float) -> dict:
    import numpy as np
    import torch

    from nest.kmeans import assign
    from nest.kmeans.features import Featurizer, mfcc_recipe

    torch.set_num_threads(1)
    audio, source = speech_audio()
    featurizer = Featurizer(mfcc_recipe())
    centroids = torch.from_numpy(np.random.default_rng(0).normal(0, 3, (clusters, 39)).astype(np.float32))

    def run(step) -> tuple[float, float]:
        """Audio seconds per wall second and per CPU second (one thread: per core, whatever the load)."""
        done, t0, c0 = 0.0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds / 2:
            for a in audio:
                step(a)
                done += len(a) / 16000
        return done / (time.perf_counter() - t0), done / (time.process_time() - c0)

    def mfcc_only(a):
        featurizer(a)

    def label(a):
        labels, _ = assign(torch.from_numpy(featurizer(a)), centroids)
        featurizer.to_tokens(labels.numpy(), len(a))

    label(audio[0])  # warm-up
    label_wall, label_cpu = run(label)
    mfcc_wall, mfcc_cpu = run(mfcc_only)
    return {"label_audio_s_per_cpu_s": round(label_cpu, 1), "label_audio_s_per_wall_s": round(label_wall, 1),
            "mfcc_only_audio_s_per_cpu_s": round(mfcc_cpu, 1), "mfcc_only_audio_s_per_wall_s": round(mfcc_wall, 1),
            "label_audio": source}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--dims", type=int, default=39)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--label-seconds", type=float, default=20.0)
    ap.add_argument("--fit-threads", type=int, default=None, help="scikit-learn threads (default: all cores)")
    ap.add_argument("--fit-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fit_child:
        fit_child(args.frames, args.dims, args.clusters, args.fit_threads)
        return
    cmd = [sys.executable, __file__, "--fit-child", "--frames", str(args.frames), "--dims", str(args.dims),
           "--clusters", str(args.clusters)] + (["--fit-threads", str(args.fit_threads)] if args.fit_threads else [])
    child = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if child.returncode != 0:
        sys.exit(f"fit child failed:\n{child.stderr}")
    fit = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
                   f"load {os.getloadavg()[0]:.1f}".replace("  ", " "),
        "frames": args.frames, "dims": args.dims, "clusters": args.clusters,
        "fit_threads": args.fit_threads or os.cpu_count(),
        **fit, **labelling_speed(args.clusters, args.label_seconds),
    }
    result["goals_met"] = {"fit_under_120_s": fit["fit_seconds"] < 120, "fit_under_2_gib": fit["fit_peak_rss_gib"] < 2,
                           "label_at_least_500_per_core": result["label_audio_s_per_cpu_s"] >= 500}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
