"""Per-bucket batch-size calibration on CPU (a fake step and a real tiny model) and the bucket report."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml
from lhotse import CutSet

from nest.calibrate import (GIB, BucketResult, MemoryPeak, TrainingStep, calibrate, merge_equal_neighbours,
                            run_calibration, search_batch_size)
from cuts.config import DataConfig
from cuts.report import bucket_report, format_table
from cuts.sampler import build_sampler
from nest.config import load_config
from nest.errors import CalibrationError
from tests.conftest import ROOT


def fake_step(base: int, per_second: int):
    calls = []

    def step(b, duration):
        calls.append((b, duration))
        peak = base + int(per_second * b * duration)
        return MemoryPeak(peak, peak)

    return step, calls


@pytest.mark.parametrize("gap", [0.05, 0.2])
def test_search_finds_boundary_within_gap_and_never_exceeds_budget(gap):
    step, calls = fake_step(base=100_000, per_second=1_000)
    budget = 5_000_000
    uppers = [2.0, 5.0, 11.0, 20.0, 35.0]
    results = calibrate(step, uppers, budget, gap=gap)
    for r in results:
        true = (budget - 100_000) // (1_000 * r.upper)  # the largest batch that fits
        assert r.batch_size <= true and r.peak.allocated <= budget
        assert (true - r.batch_size) / r.batch_size <= gap + 1e-9
    sizes = [r.batch_size for r in results]
    assert sizes == sorted(sizes, reverse=True)
    assert len(calls) < 100  # a search, not a sweep


def test_out_of_memory_counts_as_not_fitting():
    def step(b, duration):
        if b * duration > 100:
            raise torch.OutOfMemoryError("fake")
        return MemoryPeak(int(b * duration), int(b * duration))

    size, _ = search_batch_size(lambda b: (True, step(b, 10.0)) if b * 10.0 <= 100 else (False, None), 1, 0.0)
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
        return MemoryPeak(b, b)

    assert calibrate(step, [10.0], budget_bytes=10**9, gap=0.0)[0].batch_size == 10

    def buggy(b, duration):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        calibrate(buggy, [10.0], budget_bytes=10**9)


def test_one_utterance_too_long_is_a_clear_error():
    step, _ = fake_step(base=0, per_second=10**9)
    with pytest.raises(CalibrationError, match="does not fit.*max_duration"):
        calibrate(step, [30.0], budget_bytes=10**6)


def test_merge_equal_neighbours():
    peaks = [MemoryPeak(5, 6, 1), MemoryPeak(7, 7, 0), MemoryPeak(9, 10, 0)]
    merged = merge_equal_neighbours([BucketResult(2, 8, peaks[0]), BucketResult(4, 8, peaks[1]),
                                     BucketResult(6, 3, peaks[2])])
    assert [(r.upper, r.batch_size, r.peak) for r in merged] == [(4, 8, MemoryPeak(7, 7, 1)), (6, 3, peaks[2])]


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
        assert r.peak.allocated <= budget_gib * GIB
        assert step(r.batch_size, r.upper).allocated <= budget_gib * GIB
        beyond = math.ceil(r.batch_size * (1 + gap)) + 1
        assert step(beyond, r.upper).allocated > budget_gib * GIB  # the boundary lies within the gap
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


def test_a_failed_device_stops_the_search_instead_of_reading_as_too_big():
    """An execution failure that leaves the CUDA context broken would fail every later try: the search asks the
    device check after any error that is not an allocation failure, and stops with its message."""
    tried = []

    def step(b, duration):
        tried.append(b)
        if b > 10:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`")
        return MemoryPeak(b, b)

    def broken(error):
        raise CalibrationError(f"the GPU failed ({error})")

    with pytest.raises(CalibrationError, match="GPU failed.*EXECUTION_FAILED"):
        calibrate(step, [10.0], budget_bytes=10**9, gap=0.0, check_device=broken)
    assert tried == [1, 2, 4, 8, 16]  # nothing after the failure
    checked = []
    assert calibrate(step, [10.0], budget_bytes=10**9, gap=0.0, check_device=checked.append)[0].batch_size == 10
    assert len(checked) == 3  # 16, 12, 11: a healthy device, so "too big"

    def out_of_memory(b, duration):
        if b > 10:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return MemoryPeak(b, b)

    checked.clear()
    assert calibrate(out_of_memory, [10.0], budget_bytes=10**9, gap=0.0, check_device=checked.append)[0].batch_size == 10
    assert not checked  # an allocation failure says nothing about the device


def test_a_failed_try_leaves_no_gradients_and_the_next_step_updates_the_weights(monkeypatch):
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    step = TrainingStep(cfg, torch.device("cpu"), "fp32")
    step(1, 1.0)
    backward = torch.Tensor.backward

    def fail_late(self, *args, **kwargs):
        backward(self, *args, **kwargs)  # the gradients exist, then the device fails
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(step.step, "backward", fail_late)
    with pytest.raises(torch.OutOfMemoryError):
        step(2, 1.0)
    assert all(p.grad is None for p in step.model.parameters()) and step.step.between_windows
    monkeypatch.setattr(step.step, "backward", backward)
    before = step.optimizer.state_dict()["state"][0]["step"].clone()
    step(2, 1.0)
    assert step.optimizer.state_dict()["state"][0]["step"] == before + 1


def test_the_noise_tensor_of_real_batches_is_counted(monkeypatch):
    """A real batch carries clean audio and the noise added to it, two (B, S) tensors on the device."""
    import nest.calibrate.measure as measure

    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    step = TrainingStep(cfg, torch.device("cpu"), "fp32")
    step(1, 1.0)
    with_noise = step(4, 4.0).allocated
    make = measure.synthetic_batch
    monkeypatch.setattr(measure, "synthetic_batch", lambda *a: dataclasses.replace(make(*a), noise=None))
    without = step(4, 4.0).allocated
    assert with_noise - without >= 4 * 64_000 * 4  # the noise tensor, float32


def test_compiled_training_calibrates_the_compiled_model(monkeypatch):
    from nest.objectives import NestModel

    compiled = []
    monkeypatch.setattr(NestModel, "compile_encoder", lambda self, **kw: compiled.append(self))
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", ["model.compile=true"]).model
    step = TrainingStep(cfg, torch.device("cpu"), "fp32")
    assert compiled == [step.model]


def test_bucket_bounds_are_written_exactly_and_keep_the_longest_cut(tmp_path):
    """Rounded to 4 decimals, 12.34567891 became 12.3457's neighbour below: the longest cut fell outside."""
    from cuts.sampler import load_batch_sizes
    from nest.calibrate import save_batch_sizes

    longest = 12.345678912345
    results = [BucketResult(3.00004999, 8, MemoryPeak(1, 1)), BucketResult(longest, 2, MemoryPeak(2, 3, 1))]
    save_batch_sizes(results, tmp_path / "bs.yaml", {"device": "cpu"})
    uppers, sizes = load_batch_sizes(str(tmp_path / "bs.yaml"))
    assert uppers == [3.00004999, longest] and sizes == [8, 2]
    saved = yaml.safe_load((tmp_path / "bs.yaml").read_text())
    assert saved["reserved_gib"] == [0.0, 0.0] and saved["alloc_retries"] == [0, 1]


def test_training_and_calibration_share_the_allocator_settings(monkeypatch):
    from nest.training.allocator import TRAINING_ALLOC_CONF, use_training_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert use_training_allocator() == TRAINING_ALLOC_CONF == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    assert use_training_allocator() == "backend:cudaMallocAsync"  # the user's choice stands


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_on_fake_tensors_is_within_5_percent_of_the_cpu_peak(precision):
    """The estimate (fake tensors, MemTracker) against the measured CPU peak (real tensors, TensorPeak) of the same
    step; with bf16 the estimate gives CUDA's float32 functions float32 inputs, which CPU autocast does not, so
    its peak may only be higher."""
    from nest.calibrate import EstimatedStep

    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    real = TrainingStep(cfg, torch.device("cpu"), precision)
    real(1, 1.0)
    estimated = EstimatedStep(cfg, precision)
    for batch, seconds in [(6, 2.0), (2, 7.0)]:
        measured, estimate = real(batch, seconds).allocated, estimated(batch, seconds).allocated
        assert abs(estimate - measured) <= 0.05 * measured
        assert estimate >= measured if precision == "bf16" else estimate == measured


def test_secant_search_finds_the_largest_fitting_size_in_few_estimates():
    from nest.calibrate import largest_fitting

    for fixed, per, budget in [(1000, 37, 5000), (10, 1000, 500), (0, 1, 10**9), (100, 7, 120)]:
        def peak(b, fixed=fixed, per=per):
            return fixed + per * b + (b > 50) * per * (b - 50)  # convex: a second phase past 50 utterances

        calls = []
        size, found = largest_fitting(lambda b: calls.append(b) or peak(b), budget, guess=2, max_batch=4096)
        truth = max([b for b in range(1, 4097) if peak(b) <= budget], default=0)
        assert size == truth and (size == 0 or found == peak(size))
        assert len(calls) == len(set(calls)) <= 8


def test_estimate_command_writes_sizes_marked_as_an_estimate(tmp_path):
    from nest.prepare_cli import main

    (tmp_path / "bins.yaml").write_text(yaml.safe_dump({"bucket_upper_duration": [2.0, 6.5]}))
    assert main(["calibrate", "--config", str(ROOT / "configs" / "nest_tiny.yaml"), "--bins", str(tmp_path / "bins.yaml"),
                 "--out", str(tmp_path / "bs.yaml"), "--estimate-gpu-gib", "0.25"]) == 0
    saved = yaml.safe_load((tmp_path / "bs.yaml").read_text())
    assert saved["estimate"] is True and "estimate for a GPU of 0.25 GiB" in saved["device"]
    assert saved["precision"] == "bf16" and saved["bucket_upper_duration"] == [2.0, 6.5]
    assert saved["batch_sizes"][0] > saved["batch_sizes"][1] >= 1
    assert all(p <= 0.25 * 0.9 for p in saved["peak_gib"])
