"""Test helper: the peak memory of the tensors created under a dispatch mode, on any device (fake and meta
tensors included, where nothing is allocated)."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """``peak``: the most bytes of storages created under it alive at once; views of tensors made outside (inputs,
    parameters) are not counted. A storage is freed when its Python object dies, which torch keeps alive exactly
    as long as the storage."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._known: dict[int, weakref.ref] = {}

    def _see(self, storage, counted: bool) -> None:
        key = id(storage)
        if key in self._known:
            return
        n = storage.nbytes() if counted else 0

        def freed(_, key=key, n=n):
            self.live -= n
            self._known.pop(key, None)

        self._known[key] = weakref.ref(storage, freed)
        self.live += n
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
