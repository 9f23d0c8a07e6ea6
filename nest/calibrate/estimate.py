"""Peak memory of a training step estimated without the device: fake tensors, torch's MemTracker.

For a GPU you do not have (``prepare.py calibrate --estimate-gpu-gib N``): the same TrainingStep as the measured
calibration runs on fake tensors (meta storage: shapes and dtypes, no memory, no arithmetic) while torch's
MemTracker (torch.distributed._tools.mem_tracker) follows every storage: parameters, gradients, optimizer state,
activations, temporaries. A warm-up step creates the optimizer state first, as in the measured search.

Precision: fake tensors carry the CPU device, because autocast is per device and the meta device has none; CPU
autocast makes matrix products and convolutions bf16 as CUDA's does, and ``CudaFloat32Ops`` gives the functions
that CUDA's autocast runs in float32 and CPU's leaves in bf16 (softmax, log_softmax, layer_norm, exp, log, ...)
their float32 inputs. Not seen: the CUDA context, cuBLAS and cuDNN workspaces, the caching allocator's rounding
and fragmentation; the memory fraction (default 0.9) is the margin for them.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch.utils.hooks import RemovableHandle

from nest.calibrate.measure import MemoryPeak, TrainingStep
from nest.calibrate.search import GIB, BucketResult
from nest.config.schema import OptimConfig
from nest.errors import CalibrationError
from nest.objectives import build_model
from nest.objectives.config import ModelConfig

log = logging.getLogger(__name__)
T = torch.Tensor
# Functions that CUDA's autocast runs in float32 and CPU's autocast in the input's dtype (aten/src/ATen/autocast_mode.cpp).
CUDA_FLOAT32 = {
    F.log_softmax, F.softmax, torch.log_softmax, torch.softmax, T.log_softmax, T.softmax, F.layer_norm,
    torch.layer_norm, F.group_norm, torch.exp, T.exp, torch.log, T.log, torch.pow, T.pow, T.__pow__, torch.rsqrt,
    T.rsqrt, torch.reciprocal, T.reciprocal, torch.cumsum, T.cumsum, torch.sum, T.sum, torch.prod, T.prod,
    torch.logsumexp, T.logsumexp, F.softplus, F.cross_entropy, F.nll_loss, F.kl_div, F.l1_loss,
    F.binary_cross_entropy_with_logits, torch.cdist, torch.linalg.vector_norm, torch.norm, T.norm,
}


class CudaFloat32Ops(TorchFunctionMode):
    """While CPU autocast is on, the functions of CUDA_FLOAT32 get float32 inputs, as under CUDA's autocast."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CUDA_FLOAT32 and torch.is_autocast_enabled("cpu"):
            upcast = lambda t: t.float() if isinstance(t, T) and t.dtype in (torch.bfloat16, torch.float16) else t  # noqa: E731
            args, kwargs = tree_map(upcast, (args, kwargs))
        return func(*args, **kwargs)


class EstimatedStep:
    """``step(batch_size, duration)`` -> the MemoryPeak MemTracker sees for one training step on fake tensors (the
    reserved peak is the allocated one: an estimate knows no allocator)."""

    def __init__(self, cfg: ModelConfig, precision: str, optim: OptimConfig = OptimConfig()):
        self.fake = FakeTensorMode()
        model = build_model(cfg)  # for real: building runs ops fake tensors cannot (the mel filterbank's checks)
        with self.fake:
            model = model._apply(self.fake.from_tensor)
            self.step = TrainingStep(cfg, torch.device("cpu"), precision, optim=optim, model=model)
        self.model = self.step.model
        with self.fake, CudaFloat32Ops():
            self.step(1, 1.0)  # the optimizer's state, as after the first try of a search

    def __call__(self, batch_size: int, duration: float) -> MemoryPeak:
        tracker = MemTracker()
        # torch 2.11's MemTracker puts a gradient hook on every parameter of each module it enters, which torch
        # refuses for one that takes no gradient (the frozen quantizer, post_conv's subsampling): those are
        # entered in its table of hooked parameters beforehand, with handles that remove nothing.
        hooks = OrderedDict()  # a table that stays empty: removing its handles removes nothing
        for p in self.step.model.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (RemovableHandle(hooks), RemovableHandle(hooks))
        with self.fake, CudaFloat32Ops():
            tracker.track_external(self.step.model, self.step.optimizer)
            with tracker:
                self.step(batch_size, duration)
        peak = sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())
        return MemoryPeak(peak, peak)


def largest_fitting(peak_of: Callable[[int], int], budget: int, guess: int, max_batch: int = 4096) -> tuple[int, int]:
    """Largest batch size b <= ``max_batch`` with ``peak_of(b) <= budget`` (0 when one utterance does not fit), and
    its peak. The peak grows with b, affinely once the activations dominate; each next size is where the line
    through the last two estimates meets the budget, kept strictly between the largest size known to fit and the
    smallest known not to: about four estimates per bucket instead of a bisection's ten."""
    peaks: dict[int, int] = {}
    ok, fail, tried = 0, max_batch + 1, []
    b = 1
    while True:
        peaks[b] = peak_of(b)
        tried.append(b)
        ok, fail = (b, fail) if peaks[b] <= budget else (ok, b)
        if fail - ok <= 1:
            return ok, peaks.get(ok, 0)
        if len(tried) == 1:
            b = guess
        else:
            p, q = tried[-2], tried[-1]
            slope = (peaks[q] - peaks[p]) / (q - p)
            b = int(q + (budget - peaks[q]) // slope) if slope > 0 else 2 * max(ok, 1)
        b = min(max(b, ok + 1), fail - 1)


def estimate_batch_sizes(step: Callable[[int, float], MemoryPeak], uppers: list[float], budget: int,
                         max_batch: int = 4096) -> list[BucketResult]:
    """``calibrate``'s result, from estimates: per bucket, from the longest down, the largest batch that fits."""
    results: list[BucketResult] = []
    guess = 2
    for upper in reversed(uppers):
        size, peak = largest_fitting(lambda b: step(b, upper).allocated, budget, guess, max_batch)
        if size == 0:
            raise CalibrationError(f"one utterance of {upper:.1f} s does not fit in the memory budget "
                                   f"({budget / GIB:.2f} GiB): lower data.max_duration or use a smaller model")
        log.info("  %.2f s: %d utterances, estimated peak %.3f GiB", upper, size, peak / GIB)
        results.append(BucketResult(upper, size, MemoryPeak(peak, peak)))
        guess = max(2, size + 1)  # shorter utterances: at least as many fit
    return list(reversed(results))
