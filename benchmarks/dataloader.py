"""Data path: padding of the batches, and audio per CPU-second of one dataloader worker; prints one JSON object.

  python benchmarks/dataloader.py [--files 200] [--rounds 3] [--audio speech|white] [--skip-padding]

Padding (padded frames / total frames) on a LibriSpeech-like duration mix (mean about 12 s, 1-35 s) of
cuts without audio: ``padding_no_bucketing`` (lhotse's DynamicCutSampler), ``padding_30_bins``
(DynamicBucketingSampler on 30 estimated bins, ``data.batch_duration``) and ``padding_calibrated``
(per-bucket batch sizes, here sized for a memory cost linear in duration, as ``prepare.py calibrate``
gives for a budget).

Loading: ``--files`` utterances of LibriSpeech-like durations (``speech``: real recorded speech from
../shared/data/real tiled to those lengths; ``white``: white noise, or when the real audio is absent), 16 kHz
16-bit, as FLAC files, the same audio as WAV files, and as Shar shards of each format (``nest-prepare shar
--audio-format``); 20 noise files of 10 s (real noise, FLAC). Every figure is audio seconds per CPU second of
the process doing the work, with one torch thread (a shared machine's load moves wall times, much less CPU
times). Each variant is timed right after the raw FLAC decode of the same audio, and its ratio to it is the
median over ``--rounds`` rounds (``spread``: the median over variants of (max - min) / median of the rounds):

- ``raw_flac``, ``raw_wav``: soundfile decoding each clean file whole into float32, nothing else (the limit).
- ``jsonl*`` (JSON-lines manifest of FLAC files; batches made by the sampler beforehand, as the training
  process does) and ``shar*`` (each worker iterates its shards, sampler included, as training does), with
  NeMo's noise defaults: ``mix``: mixed in the worker (``data.mix_on_device=false``); ``device``: the worker
  sends the decoded noise pieces and a plan (``data.mix_on_device=true``); ``bank``: noise drawn from a bank
  on the device (``data.noise_bank_seconds``), the worker decodes clean audio only; ``clean``: no noise.
  ``jsonl_mix_float32`` sends float32 instead of 16-bit PCM, ``jsonl_mix_no_watchdog`` reads without
  ``data.read_timeout``'s thread, ``jsonl_bank_fresh_memory`` writes every batch into fresh shared memory
  instead of the buffers the training process hands back (cuts/buffers.py).
- ``in_worker``: the dataset's work measured in this process; ``dataloader``: one DataLoader worker process
  (its CPU from batch 2 to the last), which adds handing each batch to the training process; this process
  hands the buffers back at once, as the pin-memory thread of a CUDA run does after its copy.
- ``device_mix_cpu_s_per_audio_s``: ``AudioNoiseBatch.prepared`` (int16 -> float32, the plan's mixing) run
  on this CPU: what mixing on the device costs at most (an accelerator does it in a few kernels).

``*_vs_raw_flac``: ratios to ``raw_flac``. ``workers_per_gpu``: dataloader
workers one H200 needs to feed NEST-L at 40% MFU (989 TFLOP/s bf16 dense, ``--gflop-per-audio-s`` for
forward + backward), from each path's ``dataloader`` figure on this CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
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
from cuts.bins import estimate_bins  # noqa: E402
from cuts.buffers import SharedBuffers, give_back  # noqa: E402
from cuts.config import DataConfig, NoiseConfig  # noqa: E402
from cuts.dataset import NestDataset, SamplerItem, keep_freed_memory, load_mono  # noqa: E402
from cuts.mixing import NoiseBank  # noqa: E402
from cuts.noise import NoiseMixer  # noqa: E402
from cuts.sampler import DurationFilter, build_sampler  # noqa: E402
from cuts.shar import SharStream, ShardProblems, list_shards, shard_cuts  # noqa: E402
from cuts.sources import export_shar  # noqa: E402

REAL = Path(os.environ.get("NEST_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))


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


def speech_like(total: int, rng: np.random.Generator, audio: str) -> np.ndarray:
    """``total`` samples of recorded speech (real, tiled from a random place) or of white noise."""
    if audio == "speech":
        sources = [sf.read(p, dtype="float32")[0] for p in sorted((REAL / "speech").iterdir())
                   if p.suffix in (".wav", ".flac") and sf.info(p).samplerate == 16000]
        speech = np.concatenate(sources)
        return np.take(speech, np.arange(total) + rng.integers(len(speech)), mode="wrap")
    return (0.1 * rng.standard_normal(total)).astype(np.float32)


def make_corpus(files: int, tmp: Path, audio: str) -> dict:
    """Clean FLAC and WAV files of the same audio, their manifests, Shar folders of each format, noise cuts."""
    rng = np.random.default_rng(0)
    flac, wav = [], []
    for i, d in enumerate(librispeech_like_durations(files, seed=1)):
        x = speech_like(int(d * 16000), rng, audio)
        for fmt, out in (("flac", flac), ("wav", wav)):
            path = tmp / f"u{i:04d}.{fmt}"
            sf.write(path, x, 16000, subtype="PCM_16")
            out.append(Recording.from_file(path).to_cut())
    noise_audio = "speech" if audio == "speech" else "white"
    noise = []
    for i in range(20):
        path = tmp / f"n{i:02d}.flac"
        if noise_audio == "speech":
            real = np.concatenate([sf.read(p, dtype="float32")[0] for p in sorted((REAL / "noise").glob("*.wav"))])
            x = np.take(real, np.arange(10 * 16000) + rng.integers(len(real)), mode="wrap")
        else:
            x = (0.05 * rng.standard_normal(10 * 16000)).astype(np.float32)
        sf.write(path, x, 16000, subtype="PCM_16")
        noise.append(Recording.from_file(path).to_cut())
    CutSet.from_cuts(flac).to_file(tmp / "flac.jsonl.gz")
    shar = {}
    for fmt in ("flac", "wav"):
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm
            export_shar(tmp / "flac.jsonl.gz", tmp / f"shar_{fmt}", shard_size=20, seed=0, audio_format=fmt)
        shar[fmt] = str(tmp / f"shar_{fmt}")
    return {"flac": CutSet.from_cuts(flac), "wav": CutSet.from_cuts(wav), "noise": noise, "shar": shar,
            "shar_bytes_per_audio_s": {f: shar_bytes(Path(p)) for f, p in shar.items()}}


def shar_bytes(folder: Path) -> float:
    """Bytes of the audio tar files per second of audio."""
    seconds = sum(c.duration for s in list_shards(str(folder)) for c in shard_cuts(s, False, ShardProblems()))
    return sum(p.stat().st_size for p in folder.glob("recording.*.tar")) / seconds


def raw_decode(item: SamplerItem) -> float:
    """Seconds of audio decoded: the clean audio of each cut, soundfile only."""
    total = 0
    for cut in item.cuts:
        audio, sr = sf.read(cut.recording.sources[0].source, dtype="float32")
        total += len(audio) / sr
    return total


class Stamped(torch.utils.data.IterableDataset):
    """Yields (CPU seconds of this process before the batch, batch) for a map dataset over ``items`` or a stream."""

    def __init__(self, source, items=None):
        self.source, self.items = source, items

    def __iter__(self):
        keep_freed_memory()  # as the training's worker_init_fn does
        batches = (self.source[i] for i in self.items) if self.items is not None else iter(self.source)
        while True:
            t = time.process_time()
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield t, batch


def cpu_per_audio_s(stamped, batches: int) -> float:
    """CPU seconds per audio second from batch 2 to the last (the first warms up)."""
    stamps, seconds = [], []
    for t, batch in stamped:
        stamps.append(t)
        seconds.append(batch.audio_seconds)
        give_back(batch.buffers)  # as pin_memory does once it has copied the batch
        if len(stamps) == batches:
            break
    return (stamps[-1] - stamps[1]) / sum(seconds[1:-1])


def in_worker(source, items, batches: int) -> float:
    return cpu_per_audio_s(iter(Stamped(source, items)), batches)


def through_dataloader(source, items, batches: int) -> float:
    loader = torch.utils.data.DataLoader(Stamped(source, items), batch_size=None, num_workers=1, prefetch_factor=2)
    return cpu_per_audio_s(iter(loader), batches)


def raw(cuts: list) -> float:
    t, seconds = time.process_time(), 0.0
    for c in cuts:
        audio, sr = sf.read(c.recording.sources[0].source, dtype="float32")
        seconds += len(audio) / sr
    return (time.process_time() - t) / seconds


def bench_loading(files: int, tmp: Path, batch_duration: float, rounds: int, audio: str, gflop: float) -> dict:
    torch.set_num_threads(1)  # as in a DataLoader worker
    keep_freed_memory()
    data = make_corpus(files, tmp, audio)
    cfg = DataConfig(batch_duration=batch_duration, num_buckets=10, max_duration=40.0, drop_last=False)
    items = [SamplerItem(cuts=b, index=i) for i, b in enumerate(build_sampler(data["flac"], cfg, train=True, seed=0))]
    noise, bank = data["noise"], NoiseBank(data["noise"])

    def dataset(mode: str, pcm16: bool = True, timeout: float = 60.0, recycle: bool = True) -> NestDataset:
        mixer = None if mode == "clean" else NoiseMixer(NoiseConfig(), noise)
        return NestDataset(16000, mixer, seed=0, read_timeout=timeout, pcm16=pcm16, mix_on_device=mode != "mix",
                           bank=bank if mode == "bank" else None, buffers=SharedBuffers(1) if recycle else None)

    def stream(fmt: str, mode: str) -> SharStream:
        return SharStream([data["shar"][fmt]], 0, 1, 1, 0, make_sampler=lambda c, seed: build_sampler(
            c, cfg, train=True, seed=seed), keep=DurationFilter(cfg.min_duration, cfg.max_duration),
            dataset=dataset(mode, timeout=0.0), starts={}, read_timeout=60.0)

    sources = {f"jsonl_{m}": (dataset(m), items) for m in ("clean", "mix", "device", "bank")}
    sources["jsonl_mix_float32"] = (dataset("mix", pcm16=False), items)
    sources["jsonl_mix_no_watchdog"] = (dataset("mix", timeout=0.0), items)
    sources["jsonl_bank_fresh_memory"] = (dataset("bank", recycle=False), items)
    sources.update({f"shar_{f}_{m}": (stream(f, m), None) for f in ("flac", "wav") for m in ("mix", "bank")})
    n = len(items)
    tasks = {"raw_wav": lambda: raw(list(data["wav"]))}
    for name, (src, its) in sources.items():
        tasks[f"{name}/in_worker"] = lambda src=src, its=its: in_worker(src, its, n)
        tasks[f"{name}/dataloader"] = lambda src=src, its=its: through_dataloader(src, its, n)
    device_batches = [dataset("bank")[i] for i in items]
    tasks["device_mix"] = lambda: device_mix(device_batches, bank)
    ratio: dict[str, list[float]] = {name: [] for name in tasks}
    flac_speed = []
    for _ in range(rounds):
        for name, fn in tasks.items():  # each variant right after a raw decode: the pair sees the same load
            t_raw = raw(list(data["flac"]))
            t = fn()
            flac_speed.append(1.0 / t_raw)
            ratio[name].append(t_raw / t if name != "device_mix" else t)
            print(f"{name}: {ratio[name][-1]:.3f}", file=sys.stderr)
    med = {name: float(np.median(v)) for name, v in ratio.items()}
    flac = float(np.median(flac_speed))
    h200 = 0.40 * 989e12 / (gflop * 1e9)
    result = {"raw_flac_audio_s_per_cpu_s": round(flac, 1), "raw_wav_vs_raw_flac": round(med["raw_wav"], 3)}
    for name in sources:
        result[f"{name}_vs_raw_flac"] = {w: round(med[f"{name}/{w}"], 3) for w in ("in_worker", "dataloader")}
    result["spread"] = round(float(np.median([np.ptp(v) / np.median(v) for v in ratio.values()])), 3)
    result["device_mix_cpu_s_per_audio_s"] = round(med["device_mix"], 6)
    result["shar_bytes_per_audio_s"] = {f: round(b) for f, b in data["shar_bytes_per_audio_s"].items()}
    result["h200_audio_s_per_s_at_40pct_mfu"] = round(h200)
    result["workers_per_gpu"] = {name: round(h200 / (flac * med[f"{name}/dataloader"]), 1) for name in sources}
    result.update({"audio": audio, "files": files, "audio_seconds": round(sum(c.duration for c in data["flac"]), 1),
                   "rounds": rounds, "gflop_per_audio_s": gflop, "torch_threads": torch.get_num_threads()})
    return result


def device_mix(batches: list, bank: NoiseBank) -> float:
    """CPU seconds per audio second of forming the batches' float32 audio and noise from their plans."""
    samples = bank.load(load_mono)
    t = time.process_time()
    for b in batches:
        b.prepared(samples)
    return (time.process_time() - t) / sum(b.audio_seconds for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", type=int, default=50_000)
    ap.add_argument("--batch-duration", type=float, default=600.0)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--audio", choices=["speech", "white"], default="speech" if (REAL / "speech").is_dir() else "white")
    ap.add_argument("--gflop-per-audio-s", type=float, default=9.0,
                    help="NEST-L forward + backward, 2 x 10 s utterances (BENCHMARKS.md: benchmarks/model_step.py "
                         "--preset large --batch 2 --flops --device meta, grouped convolutions counted right)")
    ap.add_argument("--skip-padding", action="store_true", help="only the loading speed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {} if args.skip_padding else bench_padding(args.cuts, args.batch_duration, tmp)
        result.update(bench_loading(args.files, tmp, 200.0, args.rounds, args.audio, args.gflop_per_audio_s))
    result.update({"cuts": args.cuts, "batch_duration": args.batch_duration,
                   "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%d")})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
