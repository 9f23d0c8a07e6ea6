"""The data stream at scale, simulated as rank 0 of N; prints one JSON object.

  python benchmarks/scale.py [--cuts 3000] [--shard-size 10] [--steps 40]

For world sizes 1, 8 and 64, JSONL manifests (lhotse's sampler in the training process, the map-style path)
against Lhotse Shar (a sampler per dataloader worker over its own shards, cuts/shar.py):
- ``sampling_ms_per_step``: CPU time the training thread spends sampling the next batch (its own thread time:
  waiting is not counted), median over ``--steps`` steps. JSONL: the sampler parses world_size batches of
  manifest lines per step on that thread. Shar: the thread only takes a finished batch from a worker
  (2 workers, one torch thread each, running ahead while the thread "trains" for 20 ms a step); its time
  there less ``ipc_ms_per_step``, the same DataLoader handing over ready-made batches of the same shape.
- ``training_thread_ms_per_step``: all of it (sampling plus taking the batch from a worker).
- ``bytes_per_rank_fraction``: bytes rank 0 reads in one epoch over the bytes of the whole data set
  (manifest + audio). JSONL: the whole manifest plus the audio of its own cuts. Shar: its shards only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lhotse import CutSet, MonoCut, Recording  # noqa: E402

from cuts.bins import Bins, estimate_bins  # noqa: E402
from cuts.config import DataConfig  # noqa: E402
from cuts.dataset import AudioNoiseBatch  # noqa: E402
from cuts.sampler import DurationFilter, EpochSampler, build_sampler, open_cuts  # noqa: E402
from cuts.shar import SharStream, list_shards  # noqa: E402

WORLDS = (1, 8, 64)


def make_corpus(tmp: Path, n: int, shard_size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    cuts = []
    for i in range(n):
        path = tmp / "audio" / f"spk{i % 50}" / f"{i:05d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(int(rng.uniform(1.0, 4.0) * 16000))).astype(np.float32), 16000)
        rec = Recording.from_file(path, recording_id=f"spk{i % 50}/{i:05d}")
        cuts.append(MonoCut(id=rec.id, start=0, duration=rec.duration, channel=0, recording=rec))
    manifest = tmp / "cuts.jsonl.gz"
    CutSet(cuts).to_file(manifest)
    (tmp / "shar").mkdir()
    CutSet(cuts).to_shar(tmp / "shar", fields={"recording": "flac"}, shard_size=shard_size)
    return manifest, tmp / "shar"


def config() -> DataConfig:
    return DataConfig(batch_duration=30.0, num_buckets=4, min_duration=0.5, max_duration=10.0, drop_last=True,
                      shuffle_buffer_size=1000, num_workers=2)


def jsonl(manifest: Path, world: int, steps: int) -> tuple[float, float]:
    cfg = config()
    sampler = EpochSampler(build_sampler(open_cuts(str(manifest), 0), cfg, train=True, seed=0, world_size=world,
                                         rank=0), endless=False)
    times, audio_bytes, it = [], 0, iter(sampler)
    while True:
        t0 = time.thread_time()
        item = next(it, None)
        if item is None:
            break
        times.append(time.thread_time() - t0)
        audio_bytes += sum(os.path.getsize(c.recording.sources[0].source) for c in item.cuts)
    total = os.path.getsize(manifest) + sum(os.path.getsize(c.recording.sources[0].source)
                                            for c in open_cuts(str(manifest), 0))
    return statistics.median(times[:steps]) * 1000, (os.path.getsize(manifest) + audio_bytes) / total


class CutIds(torch.utils.data.Dataset):
    """A batch as its cut ids: what the training thread receives, without the audio decode."""

    def __getitem__(self, item):
        return AudioNoiseBatch(audio=torch.zeros(1, 1), audio_lens=torch.ones(1, dtype=torch.long),
                               cut_ids=[c.id for c in item.cuts])


class Ready(torch.utils.data.IterableDataset):
    """Batches of the same shape as CutIds's, made without sampling: the cost of the hand-over alone."""

    def __iter__(self):
        while True:
            yield AudioNoiseBatch(audio=torch.zeros(1, 1), audio_lens=torch.ones(1, dtype=torch.long),
                                  cut_ids=[f"spk1/{i:05d}" for i in range(12)])


def handover_ms(dataset, steps: int) -> float:
    """Median CPU time of the training thread per next() of a 2-worker DataLoader that runs ahead."""
    it, times = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, prefetch_factor=4)), []
    next(it)  # workers started
    for _ in range(steps):
        time.sleep(0.02)  # the step's compute, during which the workers sample and read ahead
        t0 = time.thread_time()
        next(it)
        times.append(time.thread_time() - t0)
    return statistics.median(times) * 1000


def shar(folder: Path, world: int, steps: int, bins: Bins) -> tuple[float, float]:
    cfg = config()
    stream = SharStream([str(folder)], rank=0, world_size=world, num_workers=cfg.num_workers, seed=0,
                        make_sampler=lambda cuts, seed: build_sampler(cuts, cfg, train=True, seed=seed, bins=bins),
                        keep=DurationFilter(cfg.min_duration, cfg.max_duration), dataset=CutIds(), starts={})
    ms = handover_ms(stream, steps)
    mine = [s for w in range(cfg.num_workers) for s in stream.shards_of(0, w)]
    size = lambda shards: sum(os.path.getsize(s.cuts) + os.path.getsize(s.recording) for s in shards)  # noqa: E731
    return ms, size(mine) / size(list_shards(str(folder)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", type=int, default=3000)
    ap.add_argument("--shard-size", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"cuts": args.cuts, "shard_size": args.shard_size, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "jsonl": {}, "shar": {}}
    with tempfile.TemporaryDirectory() as d:
        manifest, folder = make_corpus(Path(d), args.cuts, args.shard_size)
        bins, _ = estimate_bins(open_cuts(str(manifest), 0), 4)  # as `prepare.py bins` gives training
        ipc = handover_ms(Ready(), args.steps)
        result["ipc_ms_per_step"] = round(ipc, 3)
        for world in WORLDS:
            ms, frac = jsonl(manifest, world, args.steps)
            result["jsonl"][world] = {"sampling_ms_per_step": round(ms, 3), "training_thread_ms_per_step":
                                      round(ms + ipc, 3), "bytes_per_rank_fraction": round(frac, 4)}
            ms, frac = shar(folder, world, args.steps, bins)
            result["shar"][world] = {"sampling_ms_per_step": round(max(0.0, ms - ipc), 3),
                                     "training_thread_ms_per_step": round(ms, 3), "bytes_per_rank_fraction": round(frac, 4)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
