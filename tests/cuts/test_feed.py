"""The training feed: exact resume from every storage format and with every place of mixing; workers per rank."""
import pytest
import torch

from cuts.audio import load_mono
from cuts.config import DataConfig, NoiseConfig
from cuts.feed import DataFeed, resolve_workers
from cuts.sources import export_shar


@pytest.fixture(scope="module")
def sources(tiny_corpus, tmp_path_factory):
    """The tiny corpus's train cuts as a manifest and as Shar shards of 4 cuts with FLAC and with WAV audio."""
    out = {"jsonl": str(tiny_corpus["train"])}
    for fmt in ("flac", "wav"):
        folder = tmp_path_factory.mktemp(f"shar_{fmt}")
        export_shar(tiny_corpus["train"], folder, shard_size=4, seed=1, audio_format=fmt)
        out[f"shar_{fmt}"] = str(folder)
    return out


def batches(feed: DataFeed, n: int) -> list:
    """The first ``n`` batches of the feed's training loader, each committed as a training step does, as the
    model would take them (prepared, with the noise bank)."""
    out, loader = [], iter(feed.train_dataloader())
    bank = feed.bank.load(load_mono) if feed.bank is not None else None
    for _ in range(n):
        batch = next(loader)
        feed.batch_done(batch, window_end=True)
        out.append(batch.prepared(bank))
    return out


@pytest.mark.parametrize("mixing", ["worker", "device", "bank"])
@pytest.mark.parametrize("source", ["jsonl", "shar_flac", "shar_wav"])
def test_resume_continues_exactly_where_the_checkpoint_stands(tiny_corpus, sources, source, mixing):
    cfg = DataConfig(train_cuts=[sources[source]], noise_cuts=[str(tiny_corpus["noise"])], bins=str(tiny_corpus["bins"]),
                     batch_duration=10, drop_last=False, num_workers=2, mix_on_device=mixing != "worker",
                     noise_bank_seconds=15.0 if mixing == "bank" else 0.0, noise=NoiseConfig(prob=0.8))
    uninterrupted = batches(DataFeed(cfg, 16000, seed=3), 9)
    first = DataFeed(cfg, 16000, seed=3)
    before = batches(first, 4)
    resumed = DataFeed(cfg, 16000, seed=3)
    resumed.load_state_dict(first.state_dict())
    after = batches(resumed, 5)
    assert any(b.noise is not None for b in uninterrupted)
    for a, b in zip(uninterrupted, before + after):
        assert (a.epoch, a.index, a.worker, a.cut_ids) == (b.epoch, b.index, b.worker, b.cut_ids)
        assert a.audio.dtype == torch.float32 and torch.equal(a.audio, b.audio)
        assert (a.noise is None) == (b.noise is None)
        if a.noise is not None:
            assert torch.equal(a.noise, b.noise)


def test_auto_workers_are_the_cores_of_each_local_rank_less_one(monkeypatch):
    import os

    import cuts.feed

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(cuts.feed, "_cpu_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", 1) == 15 and resolve_workers("auto", 2) == 7 and resolve_workers("auto", 8) == 1
    assert resolve_workers("auto", 32) == 1 and resolve_workers(3, 8) == 3
    monkeypatch.setattr(cuts.feed, "_cpu_quota", lambda: 8)  # a container's quota of 8 CPUs, all 16 visible
    assert resolve_workers("auto", 2) == 3
    monkeypatch.setattr(cuts.feed, "_cpu_quota", lambda: None)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")  # SLURM runs each of 8 ranks as a task with 12 cores
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    assert resolve_workers("auto", 8) == 11
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")  # one task holds the 8 ranks: its cores are shared
    assert resolve_workers("auto", 8) == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    monkeypatch.setattr(cuts.feed, "_cpu_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    feed = DataFeed(DataConfig(num_workers="auto"), 16000, 0)
    feed.place(world_size=2, rank=1, pin_memory=False, local_world_size=1)
    assert feed.num_workers == 1
