"""Torch files read as data: tensors and plain containers only, never pickled code."""
from __future__ import annotations

import pickle
from typing import Any

import torch

from nest.errors import CheckpointError


def safe_torch_load(source: Any, name: str) -> Any:
    """torch.load restricted to tensors and plain containers; a pickled object is refused, not run."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{name}: refusing to load, the file holds pickled Python objects beyond tensors and plain "
            f"containers, and loading it would run code ({str(e).splitlines()[0]}). Re-save its state_dict "
            f"with torch.save(model.state_dict(), path) from a trusted environment."
        ) from None
