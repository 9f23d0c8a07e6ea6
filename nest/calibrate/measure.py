"""One try of the calibration: a full training step of the model on a synthetic batch, and its peak memory.

The step is training's own (nest.training.step.GuardedStep with the run's optimizer, precision and, when training
compiles, the compiled encoder), on a batch shaped as the data feed makes them. On CUDA the allocator runs with
training's settings (nest.training.allocator) and each try ends with a synchronisation, so that an error a kernel
raises asynchronously is charged to the try that launched it; on CPU the peak counts tensor bytes.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cuts.dataset import AudioNoiseBatch
from nest.config.schema import OptimConfig
from nest.errors import CalibrationError
from nest.objectives import build_model
from nest.objectives.config import ModelConfig
from nest.training.optim import make_optimizer
from nest.training.step import GuardedStep, StepOptions, forward_batch


class TensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage created while active (CPU tensors have no allocator statistics). Storages that
    an op receives before it made them (parameters, inputs, and views of them) count nothing. A storage is known by
    its Python object, which torch keeps alive exactly as long as the storage (also for fake tensors)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.known: dict[int, weakref.ref] = {}

    def _see(self, storage: torch.UntypedStorage, counted: bool) -> None:
        key = id(storage)
        if key in self.known:
            return
        nbytes = storage.nbytes() if counted else 0

        def freed(_, key=key, nbytes=nbytes):
            self.live -= nbytes
            self.known.pop(key, None)

        self.known[key] = weakref.ref(storage, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._see(t.untyped_storage(), counted=False)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t.untyped_storage(), counted=True)
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


@dataclass
class MemoryPeak:
    """The peak memory of one try, in bytes. On CUDA, the caching allocator's peaks of allocated and reserved memory
    and how often it had to free its cache and retry an allocation (a sign of fragmentation near the limit); on CPU
    the tensor bytes, as both."""

    allocated: int
    reserved: int
    alloc_retries: int = 0


class TrainingStep:
    """One full training step of the model on a synthetic batch: ``step(batch_size, duration)`` returns its
    MemoryPeak, or raises the device's error (torch.OutOfMemoryError when it runs out).

    The model is compiled when ``cfg.compile`` is set, as training compiles it (its kernels need other memory).
    ``model``: one built already (the estimate's, on fake tensors).
    """

    def __init__(self, cfg: ModelConfig, device: torch.device, precision: str, seed: int = 0,
                 optim: OptimConfig = OptimConfig(), model: Optional[torch.nn.Module] = None):
        torch.manual_seed(seed)
        self.device = device
        self.model = (build_model(cfg).to(device) if model is None else model).train()
        if cfg.compile:
            self.model.compile_encoder()
        self.sample_rate = cfg.preprocessor.sample_rate
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.optimizer, scheduler = make_optimizer(self.model, optim, cfg.encoder.d_model)
        # An out-of-memory error must reach the search ("does not fit"), not be retried in halves.
        self.step = GuardedStep(self.model, self.optimizer, scheduler, StepOptions(), retry_oom=False)

    def forward(self, batch: AudioNoiseBatch):
        """The objective's forward pass in the configured precision (what Lightning's precision plugin does)."""
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return forward_batch(self.model, batch)

    def run(self, batch: AudioNoiseBatch):
        """The guarded training step on ``batch``, nothing measured (benchmarks/gpu_acceptance.py times it)."""
        return self.step(batch, self.forward)

    def __call__(self, batch_size: int, duration: float) -> MemoryPeak:
        samples = int(duration * self.sample_rate)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.reset_accumulated_memory_stats(self.device)  # num_alloc_retries
        tracker = None if cuda else TensorPeak()
        before = 0
        if tracker is not None:
            state = [t for s in self.optimizer.state.values() for t in s.values()]
            before = tensor_bytes(self.model.parameters()) + tensor_bytes(self.model.buffers()) + tensor_bytes(state)
            tracker.__enter__()
        try:
            batch = synthetic_batch(self.model.cfg, batch_size, samples, self.device)
            self.run(batch)
            del batch
            if cuda:  # errors of the kernels this try launched are raised here, not in the next try
                torch.cuda.synchronize(self.device)
        except BaseException:
            self.abandon_try(cuda)
            raise
        finally:
            if tracker is not None:
                tracker.__exit__(None, None, None)
        if not cuda:
            return MemoryPeak(before + tracker.peak, before + tracker.peak)
        stats = torch.cuda.memory_stats(self.device)
        return MemoryPeak(stats["allocated_bytes.all.peak"], stats["reserved_bytes.all.peak"],
                          stats["num_alloc_retries"])

    def abandon_try(self, cuda: bool) -> None:
        """After a failed try: no gradients left over, the step's accumulation window closed, the device idle."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step.micro = 0
        if cuda:
            try:
                torch.cuda.synchronize(self.device)
            except RuntimeError:
                pass  # a device that failed for good fails check_device, which says so

    def check_device(self, error: BaseException) -> None:
        """After ``error``, which is not an allocation failure (a cuBLAS or cuDNN execution failure, say): raise
        CalibrationError when the device can no longer run a small matrix product. A CUDA context that took a
        sticky error fails every later call, and reading each failure as "too big" would give tiny sizes."""
        if self.device.type != "cuda":
            return
        try:
            x = torch.ones(64, 64, device=self.device)
            (x @ x).sum().item()
        except RuntimeError as probe:
            raise CalibrationError(
                f"calibrate: the GPU failed ({first_line(error)}) and then failed a 64x64 matrix product too "
                f"({first_line(probe)}): its CUDA context is broken, so no size can be measured in this process. "
                f"Nothing was written. Check the GPU (nvidia-smi), then run calibrate again; CUDA_LAUNCH_BLOCKING=1 "
                f"names the failing kernel"
            ) from None


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
