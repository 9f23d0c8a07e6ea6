"""Float32 as written, whatever the training precision: for what the targets are computed from."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# The fp32-precision settings that kernels read (torch's per-backend API): TF32 in cuBLAS matmuls and cuDNN
# convolutions (cuDNN's is on by default), oneDNN's reduced precision on CPU. Setting these leaves, and
# putting back their previous values, leaves the legacy flags (allow_tf32, set_float32_matmul_precision) as the
# user set them.
_FP32_SETTINGS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.mkldnn.matmul,
                  torch.backends.mkldnn.conv)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type``; nothing for devices without autocast (meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def exact_float32(device_type: str) -> Iterator[None]:
    """Autocast off for ``device_type`` and IEEE float32 in matmuls and convolutions (no TF32) inside.

    Its inputs must be float32 already: under autocast the layer that made them may have been bf16."""
    saved = [s.fp32_precision for s in _FP32_SETTINGS]
    try:
        for s in _FP32_SETTINGS:
            s.fp32_precision = "ieee"
        with autocast_off(device_type):
            yield
    finally:
        for s, value in zip(_FP32_SETTINGS, saved):
            s.fp32_precision = value
