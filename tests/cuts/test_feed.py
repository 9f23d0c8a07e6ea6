"""The training feed: exact resume from every storage format and with every place of mixing; workers per rank."""
import pytest
import torch

from cuts.audio import load_mono
from cuts.config import DataConfig, NoiseConfig
from cuts.cpus import resolve_workers
from cuts.feed import DataFeed
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


def _files(root, files: dict) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("membership, files, cpus", [
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2),  # a cgroup v2 container (its cgroup mounted as the root)
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("0::/batch.slice/job7\n", {"batch.slice/cpu.max": "400000 100000", "batch.slice/job7/cpu.max": "max 100000"}, 4),
    ("0::/batch.slice/job7\n", {"batch.slice/cpu.max": "400000 100000", "batch.slice/job7/cpu.max": "150000 100000"},
     2),  # the smallest quota on the way up, rounded up
    # cgroup v1 (as on this project's CI machines): a container sees its own cgroup at the controller's mount
    ("4:cpu,cpuacct:/docker/ab12\n0::/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us":
                                             "100000"}, 3),
    ("1:cpu:/\n2:cpuacct:/\n0::/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("4:cpu,cpuacct:/slurm/uid_0/job_9\n", {"cpu,cpuacct/slurm/uid_0/job_9/cpu.cfs_quota_us": "50000",
                                            "cpu,cpuacct/slurm/uid_0/job_9/cpu.cfs_period_us": "100000"}, 1),
    ("", {}, None), ("0::/\n", {"cpu.max": "garbage"}, None),
])
def test_the_cpu_quota_is_read_from_the_process_cgroup(tmp_path, membership, files, cpus):
    import cuts.cpus

    _files(tmp_path / "fs", files)
    (tmp_path / "fs").mkdir(exist_ok=True)
    (tmp_path / "cgroup").write_text(membership)
    assert cuts.cpus._cpu_quota(tmp_path / "fs", tmp_path / "cgroup") == cpus


def test_auto_workers_are_the_cores_of_each_local_rank_less_one(monkeypatch):
    import os

    import cuts.cpus

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(cuts.cpus, "_cpu_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", 1) == 15 and resolve_workers("auto", 2) == 7 and resolve_workers("auto", 8) == 1
    assert resolve_workers("auto", 32) == 1 and resolve_workers(3, 8) == 3
    monkeypatch.setattr(cuts.cpus, "_cpu_quota", lambda: 8)  # a container's quota of 8 CPUs, all 16 visible
    assert resolve_workers("auto", 2) == 3
    monkeypatch.setattr(cuts.cpus, "_cpu_quota", lambda: None)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")  # SLURM runs each of 8 ranks as a task with 12 cores
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    assert resolve_workers("auto", 8) == 11
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")  # one task holds the 8 ranks: its cores are shared
    assert resolve_workers("auto", 8) == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    monkeypatch.setattr(cuts.cpus, "_cpu_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    feed = DataFeed(DataConfig(num_workers="auto"), 16000, 0)
    feed.place(world_size=2, rank=1, pin_memory=False, local_world_size=1)
    assert feed.num_workers == 1
