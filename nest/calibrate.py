"""Per-bucket batch sizes that fill accelerator memory (OOMptimizer-style).

For each bucket, from the longest down, binary-search the largest batch for which a full training
step of the configured model (clean + noisy audio at the bucket's upper duration, forward, backward,
optimizer step, configured precision) stays within the memory budget. On a GPU the budget is a
fraction of the device's memory and the peak is CUDA's allocator peak; on CPU the budget is given and
the peak counts tensor bytes (parameters, optimizer state and everything the step allocates).

Headroom: the default budget is 90% of the GPU's memory, less an allowance for DDP's gradient buckets.
NeMo's OOMptimizer sizes have been seen to run out of memory after hours as the allocator fragments
(NVIDIA-NeMo/Speech #15847); training therefore runs the CUDA allocator with expandable segments, which
do not fragment into blocks too small for the next long batch, and retries a step that still runs out
as two half batches (nest/training/step.py). Lower ``--memory-fraction`` for more margin.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cuts.dataset import AudioNoiseBatch
from nest.config.schema import OptimConfig
from nest.objectives import build_model
from nest.objectives.config import ModelConfig
from nest.training.optim import make_optimizer
from nest.training.step import GuardedStep, StepOptions, forward_batch

log = logging.getLogger(__name__)
GIB = 2**30


class TensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage created while active (CPU tensors have no allocator statistics)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.alive: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self.alive.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.alive:
                    self.alive[key] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def synthetic_batch(cfg: ModelConfig, batch_size: int, samples: int, device: torch.device) -> AudioNoiseBatch:
    """A batch of ``batch_size`` utterances of ``samples`` each, as the data feed makes them: clean audio, the
    noise added to it (a tensor of its own, as in real batches), and (model.targets=kmeans) random labels of the
    tokens' shape."""
    audio = 0.1 * torch.randn(batch_size, samples, device=device)
    targets = None
    if cfg.targets == "kmeans":
        hop = int(cfg.preprocessor.window_stride * cfg.preprocessor.sample_rate)
        tokens = -(-samples // hop // cfg.encoder.subsampling_factor)
        targets = torch.randint(cfg.quantizer.num_classes, (batch_size, tokens + 1, cfg.quantizer.num_books),
                                device=device)
    return AudioNoiseBatch(audio=audio, audio_lens=torch.full((batch_size,), samples, device=device),
                           noise=0.05 * torch.randn_like(audio), targets=targets,
                           cut_ids=[f"synthetic-{i}" for i in range(batch_size)])


class TrainingStep:
    """One full training step (nest.training.step's, with the run's optimizer) of the model on a synthetic batch;
    returns its peak memory in bytes.

    Raises torch.OutOfMemoryError when the device runs out.
    """

    def __init__(self, cfg: ModelConfig, device: torch.device, precision: str, seed: int = 0,
                 optim: OptimConfig = OptimConfig()):
        torch.manual_seed(seed)
        self.device = device
        self.model = build_model(cfg).to(device).train()
        self.sample_rate = cfg.preprocessor.sample_rate
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.optimizer, scheduler = make_optimizer(self.model, optim, cfg.encoder.d_model)
        # An out-of-memory error must reach the search ("does not fit"), not be retried in halves.
        self.step = GuardedStep(self.model, self.optimizer, scheduler, StepOptions(), retry_oom=False)

    def _forward(self, batch: AudioNoiseBatch):
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return forward_batch(self.model, batch)

    def __call__(self, batch_size: int, duration: float) -> int:
        samples = int(duration * self.sample_rate)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        tracker = None if cuda else TensorPeak()
        before = 0
        if tracker is not None:
            state = [t for s in self.optimizer.state.values() for t in s.values()]
            before = tensor_bytes(self.model.parameters()) + tensor_bytes(self.model.buffers()) + tensor_bytes(state)
            tracker.__enter__()
        try:
            batch = synthetic_batch(self.model.cfg, batch_size, samples, self.device)
            self.step(batch, self._forward)
            del batch
        finally:
            if tracker is not None:
                tracker.__exit__(None, None, None)
        return torch.cuda.max_memory_allocated(self.device) if cuda else before + tracker.peak


# What CUDA libraries say when a batch is too large for them: besides the allocator's OutOfMemoryError, cuBLAS
# and cuDNN fail to allocate workspace or reject sizes past their 32-bit limits.
TOO_LARGE = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_NOT_SUPPORTED", "CUDNN_STATUS_NOT_SUPPORTED",
             "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_MAPPING_ERROR", "CUDNN_STATUS_EXECUTION_FAILED",
             "CUBLAS_STATUS_EXECUTION_FAILED", "canUse32BitIndexMath", "numel needs to be smaller than int32",
             "input tensor must fit into 32-bit index math", "CUDA error: invalid configuration argument")


def does_not_fit(error: BaseException) -> bool:
    """Whether ``error`` says the batch is too large for the device (rather than a bug)."""
    return isinstance(error, torch.OutOfMemoryError) or any(s in str(error) for s in TOO_LARGE)


@dataclass
class BucketResult:
    upper: float
    batch_size: int
    peak_bytes: int


def search_batch_size(
    fits: Callable[[int], tuple[bool, int]], start: int, gap: float, max_batch: int = 4096
) -> tuple[int, int]:
    """Largest batch size b >= 1 with ``fits(b)`` true, to within a relative ``gap``: grow by doubling
    from ``start`` (known or assumed to fit), then bisect until (fail - ok) / ok <= gap.
    Returns (batch size, its peak bytes); (0, 0) when even one utterance does not fit."""
    ok, ok_peak = 0, 0
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


def calibrate(
    step: Callable[[int, float], int], uppers: list[float], budget_bytes: int, gap: float = 0.05,
    max_batch: int = 4096,
) -> list[BucketResult]:
    """Batch sizes per bucket (``uppers``: upper durations, increasing), searched from the longest down."""
    results: list[BucketResult] = []

    def make_fits(duration: float):
        def fits(b: int) -> tuple[bool, int]:
            try:
                peak = step(b, duration)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not does_not_fit(e):
                    raise
                log.info("  %.2f s x %d: does not fit (%s)", duration, b, str(e).splitlines()[0][:120])
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return False, 0
            log.info("  %.2f s x %d: peak %.3f GiB (budget %.3f)", duration, b, peak / GIB, budget_bytes / GIB)
            return peak <= budget_bytes, peak
        return fits

    start = 1
    for upper in reversed(uppers):
        size, peak = search_batch_size(make_fits(upper), start, gap, max_batch)
        if size == 0:
            raise RuntimeError(
                f"one utterance of {upper:.1f} s does not fit in the memory budget ({budget_bytes / GIB:.2f} GiB): "
                f"lower data.max_duration or use a smaller model"
            )
        results.append(BucketResult(upper, size, peak))
        start = size  # shorter utterances: at least as many fit
    return list(reversed(results))


def merge_equal_neighbours(results: list[BucketResult]) -> list[BucketResult]:
    """Adjacent buckets with the same batch size become one (the longer bound is kept)."""
    merged: list[BucketResult] = []
    for r in results:
        if merged and merged[-1].batch_size == r.batch_size:
            merged[-1] = BucketResult(r.upper, r.batch_size, max(r.peak_bytes, merged[-1].peak_bytes))
        else:
            merged.append(r)
    return merged


def save_batch_sizes(results: list[BucketResult], path, meta: dict) -> None:
    """batch_sizes.yaml: the (merged) bucket bounds and one batch size per bucket, for data.bucket_batch_size."""
    doc = {
        "bucket_upper_duration": [round(r.upper, 4) for r in results],
        "batch_sizes": [r.batch_size for r in results],
        "peak_gib": [round(r.peak_bytes / GIB, 3) for r in results],
        **meta,
    }
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def run_calibration(
    cfg: ModelConfig, uppers: list[float], out_path, *, memory_fraction: float = 0.9,
    memory_budget_gib: Optional[float] = None, precision: Optional[str] = None, gap: float = 0.05,
    ddp_allowance: bool = True, device: Optional[str] = None, optim: OptimConfig = OptimConfig(),
) -> list[BucketResult]:
    """``prepare.py calibrate``: search, merge, write batch_sizes.yaml; returns the merged buckets."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        budget = int(total * memory_fraction) if memory_budget_gib is None else int(memory_budget_gib * GIB)
    elif memory_budget_gib is None:
        raise ValueError("on CPU give --memory-budget-gib (there is no device memory to take a fraction of)")
    else:
        budget = int(memory_budget_gib * GIB)
    step = TrainingStep(cfg, dev, precision, optim=optim)
    allowance = tensor_bytes(p for p in step.model.parameters() if p.requires_grad) if ddp_allowance else 0
    log.info("budget %.2f GiB, DDP gradient-bucket allowance %.2f GiB", budget / GIB, allowance / GIB)
    results = merge_equal_neighbours(calibrate(step, uppers, budget - allowance, gap))
    save_batch_sizes(results, out_path, {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "precision": precision,
        "budget_gib": round(budget / GIB, 3), "ddp_allowance_gib": round(allowance / GIB, 3), "gap": gap,
    })
    return results


def add_parser(subparsers) -> None:
    """Register ``calibrate`` on prepare.py's subcommands."""
    p = subparsers.add_parser("calibrate", help="per-bucket batch sizes that fill accelerator memory")
    p.add_argument("--config", required=True, help="training config (its model section is measured)")
    p.add_argument("--bins", required=True, help="bins.yaml from `prepare.py bins`")
    p.add_argument("--out", required=True, help="batch_sizes.yaml to write (data.bucket_batch_size)")
    p.add_argument("--memory-fraction", type=float, default=0.9, help="of the GPU's memory")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="an absolute budget (needed on CPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on GPU")
    p.add_argument("--gap", type=float, default=0.05, help="stop when the search bracket is this tight (relative)")
    p.add_argument("--no-ddp-allowance", action="store_true", help="single device: keep no room for DDP buckets")
    p.add_argument("--device", default=None)
    p.add_argument("overrides", nargs="*", help="config key=value")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> dict:
    from cuts.bins import Bins
    from nest.config.load import load_config

    cfg = load_config(args.config, args.overrides)
    results = run_calibration(
        cfg.model, Bins.load(args.bins).upper, args.out, memory_fraction=args.memory_fraction,
        memory_budget_gib=args.memory_budget_gib, precision=args.precision, gap=args.gap,
        ddp_allowance=not args.no_ddp_allowance, device=args.device, optim=cfg.optim,
    )
    return {"out": args.out, "buckets": [{"upper_s": r.upper, "batch_size": r.batch_size,
                                          "peak_gib": round(r.peak_bytes / 2**30, 3)} for r in results]}
