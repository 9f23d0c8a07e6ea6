"""Checkpoints: ours (nest.io.checkpoint) and NeMo's (the adapter nest.io.nemo), read as data.

Import order: torch_file -> nemo -> checkpoint.
"""
from nest.io.checkpoint import (LoadReport, config_differences, load_model, load_state, load_weights, nemo_model,
                                read_model_config, save_model, selected)
from nest.io.nemo import load_nemo
from nest.io.torch_file import safe_torch_load
