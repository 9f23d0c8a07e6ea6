"""The documented import path of the checkpoint API (``nest.checkpoint.load_model``); it lives in nest.io."""
from nest.errors import CheckpointError
from nest.io.checkpoint import load_model, load_state, nemo_model, save_model

__all__ = ["CheckpointError", "load_model", "load_state", "nemo_model", "save_model"]
