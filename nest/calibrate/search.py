"""The search: per bucket, from the longest down, the largest batch whose try fits the memory budget."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from nest.calibrate.measure import MemoryPeak, first_line
from nest.errors import CalibrationError

log = logging.getLogger(__name__)
GIB = 2**30

# What CUDA libraries say when a batch is too large for them: besides the allocator's OutOfMemoryError, cuBLAS
# and cuDNN fail to allocate workspace or reject sizes past their 32-bit limits.
ALLOCATION_FAILED = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
TOO_LARGE = ALLOCATION_FAILED + (
    "CUBLAS_STATUS_NOT_SUPPORTED", "CUDNN_STATUS_NOT_SUPPORTED", "CUDNN_STATUS_MAPPING_ERROR",
    "CUDNN_STATUS_EXECUTION_FAILED", "CUBLAS_STATUS_EXECUTION_FAILED", "canUse32BitIndexMath",
    "numel needs to be smaller than int32", "input tensor must fit into 32-bit index math",
    "CUDA error: invalid configuration argument")


def does_not_fit(error: BaseException) -> bool:
    """Whether ``error`` says the batch is too large for the device (rather than a bug)."""
    return isinstance(error, torch.OutOfMemoryError) or any(s in str(error) for s in TOO_LARGE)


def allocation_failed(error: BaseException) -> bool:
    """An allocator or a library could not get memory: nothing else on the device went wrong."""
    return isinstance(error, torch.OutOfMemoryError) or any(s in str(error) for s in ALLOCATION_FAILED)


@dataclass
class BucketResult:
    upper: float
    batch_size: int
    peak: MemoryPeak


def search_batch_size(
    fits: Callable[[int], tuple[bool, MemoryPeak]], start: int, gap: float, max_batch: int = 4096
) -> tuple[int, MemoryPeak]:
    """Largest batch size b >= 1 with ``fits(b)`` true, to within a relative ``gap``: grow by doubling
    from ``start`` (known or assumed to fit), then bisect until (fail - ok) / ok <= gap.
    Returns (batch size, its peak); (0, an empty peak) when even one utterance does not fit."""
    ok, ok_peak = 0, MemoryPeak(0, 0)
    b = max(1, start)
    fail = None
    while b <= max_batch:
        good, peak = fits(b)
        if not good:
            fail = b
            break
        ok, ok_peak = b, peak
        b *= 2
    if ok == 0 and fail is not None and fail > 1:  # ``start`` itself failed: search below it
        return search_batch_size(fits, 1, gap, fail - 1)
    if fail is None:
        return ok, ok_peak
    while ok and (fail - ok) / ok > gap and fail - ok > 1:
        mid = (ok + fail) // 2
        good, peak = fits(mid)
        if good:
            ok, ok_peak = mid, peak
        else:
            fail = mid
    return ok, ok_peak


def no_check(error: BaseException) -> None:
    """The device check of a step that has no device to check."""


def calibrate(
    step: Callable[[int, float], MemoryPeak], uppers: list[float], budget_bytes: int, gap: float = 0.05,
    max_batch: int = 4096, check_device: Callable[[BaseException], None] = no_check,
    on_bucket: Callable[[BucketResult], None] = lambda result: None,
) -> list[BucketResult]:
    """Batch sizes per bucket (``uppers``: upper durations, increasing), searched from the longest down;
    ``on_bucket`` is told each bucket's result as soon as it is known.

    A try that fails with an error of a too-large batch does not fit; when that error is not an allocation failure,
    ``check_device(error)`` runs first and raises when the device itself has failed (TrainingStep.check_device)."""
    results: list[BucketResult] = []

    def make_fits(duration: float):
        def fits(b: int) -> tuple[bool, MemoryPeak]:
            try:
                peak = step(b, duration)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not does_not_fit(e):
                    raise
                if not allocation_failed(e):
                    check_device(e)
                log.info("  %.2f s x %d: does not fit (%s)", duration, b, first_line(e)[:120])
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return False, MemoryPeak(0, 0)
            log.info("  %.2f s x %d: peak %.3f GiB allocated, %.3f reserved, %d allocation retries (budget %.3f)",
                     duration, b, peak.allocated / GIB, peak.reserved / GIB, peak.alloc_retries, budget_bytes / GIB)
            return peak.allocated <= budget_bytes, peak
        return fits

    start = 1
    for upper in reversed(uppers):
        size, peak = search_batch_size(make_fits(upper), start, gap, max_batch)
        if size == 0:
            raise CalibrationError(
                f"one utterance of {upper:.1f} s does not fit in the memory budget ({budget_bytes / GIB:.2f} GiB): "
                f"lower data.max_duration or use a smaller model"
            )
        results.append(BucketResult(upper, size, peak))
        on_bucket(results[-1])
        start = size  # shorter utterances: at least as many fit
    return list(reversed(results))


def merge_equal_neighbours(results: list[BucketResult]) -> list[BucketResult]:
    """Adjacent buckets with the same batch size become one (the longer bound is kept, with the larger peaks)."""
    merged: list[BucketResult] = []
    for r in results:
        if merged and merged[-1].batch_size == r.batch_size:
            a, b = merged[-1].peak, r.peak
            peak = MemoryPeak(max(a.allocated, b.allocated), max(a.reserved, b.reserved),
                              max(a.alloc_retries, b.alloc_retries))
            merged[-1] = BucketResult(r.upper, r.batch_size, peak)
        else:
            merged.append(r)
    return merged
