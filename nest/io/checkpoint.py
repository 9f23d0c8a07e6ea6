"""Our checkpoints in and out (and NeMo's through nest.io.nemo), always loaded as data, never as code."""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from nest.errors import CheckpointError
from nest.io.nemo import load_nemo, nemo_model_config
from nest.io.torch_file import safe_torch_load
from nest.objectives import EncoderModel, build_model
from nest.objectives.config import ModelConfig, model_config_from_dict


@dataclass
class LoadReport:
    """What ``load_weights`` did, by parameter name."""

    loaded: list[str]  # copied into the model
    skipped: list[str]  # in the checkpoint, not selected by the include/exclude patterns

    def __str__(self) -> str:
        encoder = sum(k.startswith("encoder.") for k in self.loaded)
        return f"{len(self.loaded)} tensors loaded ({encoder} of the encoder), {len(self.skipped)} not selected"


def selected(key: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """Whether the tensor ``key`` is chosen by fnmatch patterns (``encoder.*``): any of ``include`` (all when
    empty) and none of ``exclude``."""
    inc = not include or any(fnmatch.fnmatch(key, p) for p in include)
    return inc and not any(fnmatch.fnmatch(key, p) for p in exclude)


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], name: str, include=(), exclude=(), strict: bool = True
) -> LoadReport:
    """Copy the selected tensors of ``state`` into ``model``; unknown, missing or mis-shaped ones are errors.

    ``include``/``exclude`` are fnmatch patterns on parameter names (e.g. ``encoder.*``): a pattern that matches
    nothing is an error, and so is a selection that loads no encoder tensor. With ``strict`` every tensor of the
    model must come from the checkpoint.
    """
    own = model.state_dict()
    for kind, patterns in (("init_include", include), ("init_exclude", exclude)):
        for p in patterns:
            if not any(fnmatch.fnmatch(k, p) for k in state):
                prefixes = sorted({k.split(".")[0] + ".*" for k in state})
                raise CheckpointError(f"{name}: {kind} pattern {p!r} matches no tensor of the checkpoint "
                                      f"(its tensors: {', '.join(prefixes)})")

    unknown = sorted(k for k in state if selected(k, include, exclude) and k not in own)
    missing = sorted(k for k in own if selected(k, include, exclude) and k not in state)
    shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state if selected(k, include, exclude) and k in own and state[k].shape != own[k].shape
    )
    problems = []
    if unknown:
        problems.append(f"tensors the model does not have: {', '.join(unknown)}")
    if missing and (strict or include):
        problems.append(f"tensors the checkpoint lacks: {', '.join(missing)}")
    if shape:
        problems.append(f"shape mismatch: {'; '.join(shape)}")
    if problems:
        raise CheckpointError(f"{name}: " + " | ".join(problems))
    report = LoadReport(loaded=[k for k in state if selected(k, include, exclude)], skipped=[k for k in state if not selected(k, include, exclude)])
    if not any(k.startswith("encoder.") for k in report.loaded):
        raise CheckpointError(f"{name}: the selection loads no encoder tensor ({report}); check init_include/"
                              f"init_exclude")
    with torch.no_grad():
        for k in report.loaded:
            own[k].copy_(state[k])
    return report


# Settings that change what a tensor computes, by the parameters they concern; dropout, stochastic depth,
# dither and masking only change training.
_COMPUTE_KEYS = {
    "preprocessor": ("sample_rate", "window_size", "window_stride", "features", "n_fft", "preemph",
                     "log_zero_guard_value", "pad_to"),
    "encoder": ("n_layers", "d_model", "n_heads", "subsampling_factor", "subsampling_conv_channels",
                "ff_expansion_factor", "conv_kernel_size", "conv_norm_type", "xscaling", "untie_biases", "use_bias"),
    "quantizer": ("num_classes", "num_books", "code_dim", "dist_fn", "norm"),
}


def config_differences(theirs: ModelConfig, ours: ModelConfig, loaded: Iterable[str]) -> list[str]:
    """``model.x: checkpoint A, this run B`` for each setting that differs and matters to the loaded tensors."""
    prefixes = {k.split(".")[0] for k in loaded}
    sections = ["preprocessor", "encoder"] if prefixes & {"encoder", "preprocessor"} else []
    if prefixes & {"quantizer", "decoder"}:
        sections += ["preprocessor", "quantizer"]
    out = []
    for section in dict.fromkeys(sections):
        a, b = getattr(theirs, section), getattr(ours, section)
        out += [f"model.{section}.{k}: checkpoint {getattr(a, k)!r}, this run {getattr(b, k)!r}"
                for k in _COMPUTE_KEYS[section] if getattr(a, k) != getattr(b, k)]
    if "decoder" in prefixes and theirs.decoder_use_bias != ours.decoder_use_bias:
        out.append(f"model.decoder_use_bias: checkpoint {theirs.decoder_use_bias}, this run {ours.decoder_use_bias}")
    return out


def nemo_model(path: str | Path) -> EncoderModel:
    """A NestModel or W2vBertModel built and loaded from a NeMo ``.nemo`` file, in eval mode."""
    cfg, state = load_nemo(path)
    model = build_model(cfg)
    load_weights(model, state, str(path))
    return model.eval()


def save_model(model: EncoderModel, path: str | Path) -> None:
    """Our standalone checkpoint: the model config as plain data and the state dict."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model_config": asdict(model.cfg), "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)


def load_state(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model config and state dict (our key names) of our checkpoint or a NeMo ``.nemo`` file, read as data."""
    path = Path(path)
    if path.suffix == ".nemo":
        return load_nemo(path)
    if not path.is_file():
        near = sorted(p.name for p in Path(path).parent.glob("*.ckpt")) if Path(path).parent.is_dir() else []
        why = " (best.ckpt appears once a validation has run: trainer.val_check_interval)" \
            if Path(path).name == "best.ckpt" else ""
        raise CheckpointError(f"{path}: no such checkpoint{why}" + (f"; that folder has {', '.join(near)}" if near else ""))
    ckpt = safe_torch_load(path, str(path))
    if "model_config" in ckpt:
        cfg, state = ckpt["model_config"], ckpt["state_dict"]
    elif "hyper_parameters" in ckpt and "model_config" in ckpt["hyper_parameters"]:
        cfg = ckpt["hyper_parameters"]["model_config"]
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        raise CheckpointError(f"{path}: neither a checkpoint of this project nor a .nemo file")
    return model_config_from_dict(cfg), state


def read_model_config(path: str | Path) -> ModelConfig:
    """The model configuration stored in a checkpoint of ours or a ``.nemo`` file."""
    return nemo_model_config(path) if Path(path).suffix == ".nemo" else load_state(path)[0]


def load_model(path: str | Path) -> EncoderModel:
    """A model from our checkpoint (``save_model`` or a Lightning .ckpt of train.py) or a ``.nemo`` file, in eval mode."""
    cfg, state = load_state(path)
    model = build_model(cfg)
    load_weights(model, state, str(path))
    return model.eval()
