"""Shared-memory batch buffers that a dataloader worker reuses once the training process has copied them out.

A tensor a worker returns travels as shared memory. Fresh shared memory for every batch costs a page fault
and the zeroing of every 4 KiB page on first touch, in the worker: on the machines of BENCHMARKS.md more than
a third of what the worker spends on a batch of FLAC audio, and several times what it spends on WAV. With
``SharedBuffers`` a worker writes each batch tensor into a buffer of its own that the training process has
handed back: ``AudioNoiseBatch.pin_memory`` (the DataLoader's pin-memory thread, CUDA runs) copies the batch
into page-locked memory and then puts the buffers' keys on the worker's return queue. The worker reuses a
buffer only after reading its key from that queue, so the copy has finished before the buffer is written
again (the queue's pipe orders the two processes). Without pinning nothing comes back, and a worker
allocates fresh memory past its first ``keep`` buffers, as without recycling.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import uuid
from typing import Optional

import torch

_REGISTRY: dict[str, "SharedBuffers"] = {}  # token -> buffers, in the process that made them (the trainer)


class SharedBuffers:
    """Per-worker pools of shared-memory buffers and the queues that hand them back (made before the workers
    start, which inherit them)."""

    def __init__(self, num_workers: int, keep: int = 8):
        self.token = uuid.uuid4().hex
        self.keep = keep
        self.returns = [multiprocessing.Queue() for _ in range(max(1, num_workers))]
        _REGISTRY[self.token] = self
        self._owner: Optional[int] = None  # worker-side state, reset in each new worker process
        self._free: list[tuple[int, tuple, torch.UntypedStorage]] = []  # (capacity, key, storage)
        self._lent: dict[tuple, tuple[int, torch.UntypedStorage]] = {}
        self._batch: list[tuple] = []  # keys of the batch being made
        self._count = itertools.count()

    def _worker_state(self) -> Optional[int]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return None
        if self._owner != os.getpid():  # a new worker: nothing of the parent's pools is ours
            self._owner, self._free, self._lent, self._batch = os.getpid(), [], {}, []
        return info.id

    def take(self, nbytes: int) -> Optional[torch.UntypedStorage]:
        """A shared storage of at least ``nbytes`` for the batch being made; None outside a worker."""
        worker = self._worker_state()
        if worker is None:
            return None
        self._collect(worker)
        fits = [f for f in self._free if f[0] >= nbytes]
        if fits:
            entry = min(fits, key=lambda f: f[0])
            self._free.remove(entry)
        else:
            if len(self._free) + len(self._lent) >= self.keep:
                if not self._free:  # every buffer is out: an unpooled one, freed with its batch
                    return torch.UntypedStorage._new_shared(nbytes)
                self._free.remove(max(self._free, key=lambda f: f[0]))  # too small: make room for a larger one
            capacity = -(-int(nbytes * 1.25) // (1 << 20)) << 20  # room for the next batches' sizes, whole MiB
            entry = (capacity, (os.getpid(), next(self._count)), torch.UntypedStorage._new_shared(capacity))
        capacity, key, storage = entry
        self._lent[key] = (capacity, storage)
        self._batch.append(key)
        return storage

    def _collect(self, worker: int) -> None:
        while True:
            try:
                key = self.returns[worker].get_nowait()
            except queue.Empty:
                return
            lent = self._lent.pop(tuple(key), None)
            if lent is not None:  # keys of an earlier worker process of this slot are ignored
                self._free.append((lent[0], tuple(key), lent[1]))

    def unused(self, storage: torch.UntypedStorage, reuse: bool = True) -> None:
        """``storage`` (from ``take``) will not be sent: back to the pool at once, or with ``reuse=False`` out of
        it for good (a stalled read may still write into it: no later batch may get it)."""
        for key in self._batch:
            capacity, held = self._lent[key]
            if held.data_ptr() == storage.data_ptr():
                self._batch.remove(key)
                del self._lent[key]
                if reuse:
                    self._free.append((capacity, key, held))
                return

    def sent(self) -> tuple:
        """The handle of the batch just made, for ``give_back``: (token, worker, keys)."""
        worker = self._worker_state()
        keys, self._batch = tuple(self._batch), []
        return (self.token, worker, keys) if worker is not None and keys else ()

    def __getstate__(self) -> dict:
        return {"token": self.token, "keep": self.keep, "returns": self.returns}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._owner, self._free, self._lent, self._batch, self._count = None, [], {}, [], itertools.count()


def give_back(handle: tuple) -> None:
    """Return a batch's buffers to the worker that made it; the batch must not be read afterwards."""
    if handle:
        token, worker, keys = handle
        buffers = _REGISTRY.get(token)
        if buffers is not None:
            for key in keys:
                buffers.returns[worker].put(key)
