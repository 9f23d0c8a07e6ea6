"""The training data path: batches, noise mixing and SNR, faults, DDP."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lhotse import CutSet

from cuts.config import DataConfig, NoiseConfig
from cuts.dataset import NestDataset, SamplerItem, load_clean_and_noise
from cuts.noise import NoiseMixer
from cuts.sampler import EpochSampler, build_sampler
from tests.conftest import tiny_overrides
from tests.support.runs import trace_run

ROOT = Path(__file__).resolve().parents[2]


def resampled(path, sr=16000):
    return [c.resample(sr) if c.sampling_rate != sr else c for c in CutSet.from_file(path)]


def test_batches_hold_clean_noise_noisy_with_consistent_lengths(tiny_corpus):
    cfg = DataConfig(batch_duration=30, num_buckets=4, noise=NoiseConfig(prob=1.0, noise_ratio=0.5))
    sampler = EpochSampler(build_sampler(CutSet.from_file(tiny_corpus["train"]), cfg, train=True, seed=1),
                           endless=False)
    ds = NestDataset(16000, NoiseMixer(cfg.noise, resampled(tiny_corpus["noise"])), seed=1)
    n = 0
    for item in sampler:
        b = ds[item]
        B, S = b.audio.shape
        assert b.noise.shape == b.noisy_audio.shape == (B, S)  # clean and noise travel; noisy is formed from them
        assert int(b.audio_lens.max()) == S and b.audio_seconds == pytest.approx(int(b.audio_lens.sum()) / 16000)
        assert torch.equal(b.noisy_audio, b.audio + b.noise)
        for i, L in enumerate(b.audio_lens.tolist()):
            assert b.audio[i, L:].abs().sum() == 0 and b.noise[i, L:].abs().sum() == 0
        assert torch.isfinite(b.noisy_audio).all()
        assert b.noise.abs().sum() > 0  # prob=1: interference everywhere
        n += 1
    assert n > 2


def noise_sets(tiny_corpus, real):
    sets = {"synthetic": resampled(tiny_corpus["noise"])}
    if real is not None:
        from cuts.prepare import recording_to_cut
        from lhotse import Recording

        sets["real"] = [recording_to_cut(Recording.from_file(p), "first") for p in sorted((real / "noise").glob("*.wav"))]
    return sets


@pytest.mark.parametrize("segments", [[1, 1], [1, 3]])
def test_segment_snr_of_each_piece_matches_drawn_value(tiny_corpus, segments, request):
    real = None
    try:
        real = request.getfixturevalue("real_data")
    except pytest.skip.Exception:
        pass
    speech = resampled(tiny_corpus["train"])[:8]
    for name, noise in noise_sets(tiny_corpus, real).items():
        for noise_ratio in (1.0, 0.0):  # noise, then speech-in-speech
            mixer = NoiseMixer(NoiseConfig(prob=1.0, noise_ratio=noise_ratio, mix_rate=[0.3, 0.7],
                                           num_segments=segments), noise)
            for cut in mixer(speech, random.Random(7)):
                snr = cut.tracks[1].snr
                assert all(t.snr == snr for t in cut.tracks[1:])
                clean, added = load_clean_and_noise(cut, snr_definition="segment")
                p_clean = np.mean(clean.astype(np.float64) ** 2)
                covered = np.zeros(len(added), dtype=bool)
                for t in cut.tracks[1:]:  # each mixed segment (piece) on its own
                    start = round(t.offset * 16000)
                    seg = added[start : start + t.cut.num_samples].astype(np.float64)
                    covered[start : start + t.cut.num_samples] = True
                    if np.mean(seg**2) > 0:  # a piece falling in a pause is silent: no SNR to speak of
                        measured = 10 * np.log10(p_clean / np.mean(seg**2))
                        assert abs(measured - snr) < 0.5, (name, noise_ratio, measured, snr)
                lo, hi = (-5, 20) if noise_ratio == 1.0 else (-5, 5)
                assert lo <= snr <= hi
                assert covered.mean() <= 0.7 + 0.01


def test_same_batch_same_noise_whichever_worker(tiny_corpus):
    cfg = NoiseConfig(prob=1.0)
    ds = NestDataset(16000, NoiseMixer(cfg, resampled(tiny_corpus["noise"])), seed=5)
    item = SamplerItem(cuts=CutSet.from_file(tiny_corpus["train"]).subset(first=4), epoch=2, index=9)
    assert torch.equal(ds[item].noise, ds[item].noise)
    other = SamplerItem(cuts=item.cuts, epoch=2, index=10)
    assert not torch.equal(ds[item].noise, ds[other].noise)


def test_silent_speech_and_silent_noise_stay_finite(tmp_path):
    import soundfile as sf
    from lhotse import Recording

    from cuts.prepare import recording_to_cut

    sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(tmp_path / "speech.wav", 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000)
    silent = recording_to_cut(Recording.from_file(tmp_path / "silent.wav"), "first")
    speech = recording_to_cut(Recording.from_file(tmp_path / "speech.wav"), "first")
    mixer = NoiseMixer(NoiseConfig(prob=1.0, noise_ratio=1.0), [silent])
    ds = NestDataset(16000, mixer, seed=0)
    for cuts in ([speech], [silent]):
        b = ds[SamplerItem(cuts=CutSet(cuts))]
        assert torch.isfinite(b.noisy_audio).all()
    mixer = NoiseMixer(NoiseConfig(prob=1.0, noise_ratio=1.0), [speech])
    b = NestDataset(16000, mixer, seed=0)[SamplerItem(cuts=CutSet([silent]))]
    assert torch.isfinite(b.noisy_audio).all()


def test_corrupt_file_is_dropped_and_counted(tiny_corpus, tmp_path, caplog):
    import shutil

    from lhotse import Recording

    from cuts.prepare import recording_to_cut

    cuts = list(CutSet.from_file(tiny_corpus["train"]).subset(first=4))
    copy = tmp_path / "victim.flac"
    shutil.copy(cuts[1].recording.sources[0].source, copy)
    cuts[1] = recording_to_cut(Recording.from_file(copy), "first")
    copy.write_bytes(np.random.default_rng(0).bytes(5000))  # corrupted after preparation
    b = NestDataset(16000, None, seed=0)[SamplerItem(cuts=CutSet(cuts))]
    assert b.num_failed == 1
    assert "victim" not in b.cut_ids and len(b.cut_ids) == 3
    assert any("victim" in r.getMessage() for r in caplog.records)


def test_two_ddp_processes_see_disjoint_cuts_and_take_equal_steps(tiny_corpus, tmp_path):
    overrides = tiny_overrides(tiny_corpus, tmp_path / "exp", **{
        "trainer.max_steps": 6, "trainer.strategy": "ddp", "trainer.devices": 2, "data.num_workers": 0,
        "data.val_cuts": "[]", "data.batch_duration": 10, "trainer.checkpoint_every_n_steps": 100})
    assert trace_run(tmp_path / "t.jsonl", -1, overrides) == 0
    recs = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    by_rank = {r: [x for x in recs if x["rank"] == r] for r in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == 6
    for epoch in {x["epoch"] for x in recs}:
        ids = [set(i for x in by_rank[r] if x["epoch"] == epoch for i in x["cut_ids"]) for r in (0, 1)]
        assert not ids[0] & ids[1], epoch
