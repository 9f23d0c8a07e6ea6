"""Counting host-device synchronisations: ops whose result the host must wait for.

On an accelerator, reading a value of a device tensor on the host (``.item()``, ``bool(t)``, ``if t.any():``)
or running an op whose output shape depends on the data (``nonzero``, boolean-mask indexing, ``unique``)
stalls the host until the device has caught up, so the host can no longer queue work ahead. On CPU
these cost nothing, but they are the same calls: counting them in a CPU run shows what a GPU run would
sync on, which is how the tests check the training step without a GPU.

    with HostSyncCounter() as syncs:
        loss = model(...).loss
        loss.backward()
    assert syncs.count == 0, syncs.calls
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# Ops that read device data on the host or whose output shape depends on the data.
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t) through is_nonzero
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,  # returns a Python bool
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten._unique.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,  # without output_size the output length is data
    aten.bincount.default,  # on CUDA it reads the maximum to size its output
    aten.histc.default,  # on CUDA it reads min and max when the range is not given
}
# Ops that sync only with a boolean index (converted to positions with nonzero inside the kernel).
BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Copies: a sync when they bring device data to the host.
COPY_OPS = {aten._to_copy.default, aten.copy_.default}


def _devices(args, kwargs) -> set[str]:
    return {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}


class HostSyncCounter(TorchDispatchMode):
    """Counts host synchronisations of the ops run under it (forward, backward and optimizer alike).

    ``device_type``: count only ops on tensors of that device type; None (the default) counts every
    device, so that in a CPU run the CPU stands in for the accelerator. ``calls`` names each op counted.
    """

    def __init__(self, device_type: Optional[str] = None):
        super().__init__()
        self.device_type = device_type
        self.calls: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def _is_sync(self, func, args, kwargs) -> bool:
        devices = _devices(args, kwargs)
        if self.device_type is not None and self.device_type not in devices:
            return False
        if func in SYNC_OPS:
            return True
        if func in BOOL_INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
        if func in COPY_OPS:
            # A copy from an accelerator into host memory (tolist, .cpu(), numpy()).
            if func is aten.copy_.default:
                dst, src = args[0], args[1]
                return dst.device.type == "cpu" and src.device.type != "cpu"
            target = kwargs.get("device")
            return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._is_sync(func, args, kwargs):
            self.calls[str(func)] += 1
        return func(*args, **kwargs)
