"""BatchNorm over the global batch of a DDP run, without host-device synchronisation (plain torch).

torch's SyncBatchNorm all-gathers each rank's (mean, invstd, count) and drops the ranks without data with a
boolean mask, whose output shape depends on the counts: the host waits for the device three times per layer
(``torch/nn/modules/_functions.py``). Here each rank all-reduces one float64 vector, (sum, sum of squares,
count) per channel, so an empty rank contributes zeros and nothing is filtered: one collective in the forward
pass and one in the backward pass per layer, and the host never waits. Each rank's sums come from its own
mean and variance (float32, from float32 inputs also under bf16 autocast), turned into sums in float64, so
the global variance keeps float32 precision where a float32 sum of squares would cancel.

The collectives run on any backend (NCCL, gloo), so the same layers run in CPU tests. With one process, in
eval mode or without running statistics, the layer is torch's BatchNorm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nest.model.precision import autocast_off


def _reduced_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) -> broadcastable against x (B, C, ...)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def global_stats(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance (float32, (C,)) and element count (float32, ()) of x (B, C, ...) over all ranks of
    ``group``: one all-reduce of (sum, sum of squares, count), float64."""
    C, n = x.shape[1], x.numel() // max(x.shape[1], 1)
    if n:
        var, mean = torch.var_mean(x.float(), dim=_reduced_dims(x), correction=0)
        mean = mean.double()
        sums = torch.cat([mean * n, (var.double() + mean * mean) * n])
    else:  # an empty rank still takes part in the collective
        sums = torch.zeros(2 * C, dtype=torch.float64, device=x.device)
    packed = torch.cat([sums, torch.full((1,), float(n), dtype=torch.float64, device=x.device)])
    dist.all_reduce(packed, group=group)
    total, squares, count = packed[:C], packed[C:-1], packed[-1]
    mean = total / count.clamp(min=1)
    var = (squares / count.clamp(min=1) - mean * mean).clamp(min=0)
    return mean.float(), var.float(), count.float()


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with global statistics; the backward pass all-reduces the two
    per-channel sums the input gradient needs (as torch's SyncBatchNorm: the loss is the sum over ranks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        return torch.addcmul(_per_channel(shift, x), x, _per_channel(scale, x)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        dims = _reduced_dims(x)
        xhat = (x.float() - _per_channel(mean, x)) * _per_channel(invstd, x)
        dy = dy.float()
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)  # (C,) each, this rank's
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(packed, group=ctx.group)
            C = mean.shape[0]
            mean_dy, mean_dy_xhat = packed[:C] / count.clamp(min=1), packed[C:] / count.clamp(min=1)
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = (dy - _per_channel(mean_dy, x) - xhat * _per_channel(mean_dy_xhat, x)) * _per_channel(scale, x)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


class SyncedBatchNorm(_BatchNorm):
    """A BatchNorm layer (any dimension) whose training statistics are those of the global batch, all ranks of
    ``process_group`` (None: all) together; running statistics equal on every rank (module docstring)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.reverts_to: type[_BatchNorm] = nn.BatchNorm1d  # the class convert_batchnorm replaced

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (B, C, ...), got {input.dim()}")

    def _world(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_available() and dist.is_initialized() else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or self._world() == 1:
            return super().forward(x)
        return self._synced(x)

    # Its collectives are left out of compiled graphs (a graph break per layer when the encoder is compiled).
    @torch.compiler.disable
    def _synced(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device.type):
            with torch.no_grad():
                mean, var, count = global_stats(x.detach(), self.process_group)
                if self.track_running_stats:
                    self._update_running_stats(mean, var, count)
            invstd = torch.rsqrt(var + self.eps)
            return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean, invstd, count, self.process_group)

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """As torch's BatchNorm: the unbiased variance, an exponential average (or a cumulative one with
        momentum=None); unchanged when no rank had data."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
        seen = count > 0
        unbiased = var * count / (count - 1).clamp(min=1)
        for buffer, value in ((self.running_mean, mean), (self.running_var, unbiased)):
            buffer.copy_(torch.where(seen, buffer * (1 - factor) + value * factor, buffer))


def _moved(old: _BatchNorm, new: _BatchNorm) -> _BatchNorm:
    """``new`` with ``old``'s parameters and buffers (the same tensors: an optimizer built before keeps them)."""
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    if old.track_running_stats:
        new.running_mean, new.running_var = old.running_mean, old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    return new


def convert_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm layer of ``module`` (torch's SyncBatchNorm included) replaced by a SyncedBatchNorm holding
    the same parameters and buffers; returns ``module`` (or the new layer when ``module`` is one)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncedBatchNorm):
        new = SyncedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group, device="meta")
        new.reverts_to = nn.BatchNorm1d if isinstance(module, nn.SyncBatchNorm) else type(module)
        module = _moved(module, new)
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, process_group))
    return module


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """convert_batchnorm undone: each SyncedBatchNorm back to the class it replaced, with the same tensors."""
    if isinstance(module, SyncedBatchNorm):
        old = module
        module = _moved(old, old.reverts_to(old.num_features, old.eps, old.momentum, old.affine,
                                           old.track_running_stats, device="meta"))
    for name, child in module.named_children():
        module.add_module(name, revert_batchnorm(child))
    return module
