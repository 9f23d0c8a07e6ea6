"""The CUDA caching allocator's settings, the same for training and for the calibration that sizes its batches."""
from __future__ import annotations

import os

import torch

# Calibrated batch sizes must hold for days: an allocator that maps memory in growable segments does not
# fragment into blocks too small for the next long batch.
TRAINING_ALLOC_CONF = "expandable_segments:True"


def use_training_allocator() -> str:
    """Expandable segments for the CUDA caching allocator, unless the user set PYTORCH_CUDA_ALLOC_CONF (or torch's
    newer PYTORCH_ALLOC_CONF) themselves; returns the settings in force. PyTorch reads the variable when CUDA
    initialises; if it already has, the settings are applied to the running allocator."""
    conf = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF",
                                                                         TRAINING_ALLOC_CONF)
    if torch.cuda.is_initialized():
        torch._C._accelerator_setAllocatorSettings(conf)
    return conf
