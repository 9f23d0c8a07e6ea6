"""Per-bucket batch-size calibration on CPU (a fake step and a real tiny model) and the bucket report."""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from lhotse import CutSet

from nest.calibrate import (GIB, BucketResult, TrainingStep, calibrate, merge_equal_neighbours, run_calibration,
                            search_batch_size)
from cuts.config import DataConfig
from cuts.report import bucket_report, format_table
from cuts.sampler import build_sampler
from nest.config import load_config
from tests.conftest import ROOT


def fake_step(base: int, per_second: int):
    calls = []

    def step(b, duration):
        calls.append((b, duration))
        return base + int(per_second * b * duration)

    return step, calls


@pytest.mark.parametrize("gap", [0.05, 0.2])
def test_search_finds_boundary_within_gap_and_never_exceeds_budget(gap):
    step, calls = fake_step(base=100_000, per_second=1_000)
    budget = 5_000_000
    uppers = [2.0, 5.0, 11.0, 20.0, 35.0]
    results = calibrate(step, uppers, budget, gap=gap)
    for r in results:
        true = (budget - 100_000) // (1_000 * r.upper)  # the largest batch that fits
        assert r.batch_size <= true and r.peak_bytes <= budget
        assert (true - r.batch_size) / r.batch_size <= gap + 1e-9
    sizes = [r.batch_size for r in results]
    assert sizes == sorted(sizes, reverse=True)
    assert len(calls) < 100  # a search, not a sweep


def test_out_of_memory_counts_as_not_fitting():
    def step(b, duration):
        if b * duration > 100:
            raise torch.OutOfMemoryError("fake")
        return int(b * duration)

    size, _ = search_batch_size(lambda b: (True, step(b, 10.0)) if b * 10.0 <= 100 else (False, 0), 1, 0.0)
    assert size == 10
    results = calibrate(step, [10.0], budget_bytes=10**9, gap=0.0)
    assert results[0].batch_size == 10


def test_any_cuda_error_of_a_too_large_batch_counts_as_not_fitting_and_bugs_still_raise():
    def step(b, duration):
        if b > 12:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        if b > 10:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                               "non-contiguous input.")
        return b

    assert calibrate(step, [10.0], budget_bytes=10**9, gap=0.0)[0].batch_size == 10

    def buggy(b, duration):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        calibrate(buggy, [10.0], budget_bytes=10**9)


def test_one_utterance_too_long_is_a_clear_error():
    step, _ = fake_step(base=0, per_second=10**9)
    with pytest.raises(RuntimeError, match="does not fit.*max_duration"):
        calibrate(step, [30.0], budget_bytes=10**6)


def test_merge_equal_neighbours():
    merged = merge_equal_neighbours([BucketResult(2, 8, 5), BucketResult(4, 8, 7), BucketResult(6, 3, 9)])
    assert [(r.upper, r.batch_size, r.peak_bytes) for r in merged] == [(4, 8, 7), (6, 3, 9)]


def test_real_tiny_model_under_small_budget(tmp_path):
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    budget_gib = 0.15
    gap = 0.25
    results = run_calibration(cfg, [3.0, 8.0], tmp_path / "bs.yaml", memory_budget_gib=budget_gib, gap=gap,
                              ddp_allowance=False, device="cpu")
    saved = yaml.safe_load((tmp_path / "bs.yaml").read_text())
    assert saved["batch_sizes"] == [r.batch_size for r in results]
    step = TrainingStep(cfg, torch.device("cpu"), "fp32")
    step(1, 1.0)  # optimizer state exists, as during the search
    for r in results:
        assert r.peak_bytes <= budget_gib * GIB
        assert step(r.batch_size, r.upper) <= budget_gib * GIB
        beyond = math.ceil(r.batch_size * (1 + gap)) + 1
        assert step(beyond, r.upper) > budget_gib * GIB  # the boundary lies within the gap
    assert results[0].batch_size > results[-1].batch_size


def test_sampler_uses_calibrated_sizes_and_report(tiny_corpus, tmp_path):
    cuts = CutSet.from_file(tiny_corpus["train"])
    (tmp_path / "bs.yaml").write_text(yaml.safe_dump({"bucket_upper_duration": [4.0, 8.0, 12.0], "batch_sizes": [5, 3, 2]}))
    sampler = build_sampler(cuts, DataConfig(bucket_batch_size=str(tmp_path / "bs.yaml"), min_duration=0.5,
                                             drop_last=True), train=True, seed=0)
    seen = 0
    for batch in sampler:
        longest = max(c.duration for c in batch)
        expected = 5 if longest < 4.0 else 3 if longest < 8.0 else 2
        assert len(batch) == expected
        seen += 1
    assert seen > 0
    durations = np.array([c.duration for c in cuts])
    rows = bucket_report(durations[durations <= 12.0], [4.0, 8.0, 12.0], [5, 3, 2], None)
    assert sum(r["cuts"] for r in rows) == int((durations <= 12.0).sum())
    assert all(0 <= r["padding"] < 1 for r in rows) and "steps per epoch" in format_table(rows)


def test_out_of_memory_in_the_real_step_is_not_retried_but_counts_as_not_fitting(monkeypatch):
    """The training step retries an out-of-memory batch in halves; calibration must see the error instead."""
    from nest.objectives import NestModel

    forward = NestModel.forward

    def tight(self, audio, *args, **kwargs):
        if audio.shape[0] >= 4:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return forward(self, audio, *args, **kwargs)

    monkeypatch.setattr(NestModel, "forward", tight)
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    step = TrainingStep(cfg, torch.device("cpu"), "fp32")
    results = calibrate(step, [1.0], budget_bytes=10 * GIB, gap=0.0)
    assert results[0].batch_size == 3
