"""Checkpoints in and out: NeMo ``.nemo`` files and our own, always loaded as data, never as code."""
from __future__ import annotations

import fnmatch
import io
import pickle
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from torch import nn

from nest.config import (
    ConfigError,
    EncoderConfig,
    MaskingConfig,
    ModelConfig,
    PreprocessorConfig,
    QuantizerConfig,
    W2vBertConfig,
)
from nest.model import NestModel
from nest.nemo_config import (
    W2VBERT_NEMO_PREFIXES,
    CheckpointError,
    is_w2vbert_nemo,
    model_config_from_nemo,
    w2vbert_config_from_nemo,
)
from nest.w2vbert import W2vBertModel

# Buffers that NeMo stores and we derive from the config.
DERIVED_NEMO_KEYS = ("preprocessor.featurizer.window", "preprocessor.featurizer.fb")


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


def _nemo_members(path: Path) -> tuple[dict, dict]:
    """(model_config, state_dict) from a .nemo tar, read in memory."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .nemo archive ({e})") from None
    with tar:
        names = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for needed in ("model_config.yaml", "model_weights.ckpt"):
            if needed not in names:
                raise CheckpointError(f"{path}: no {needed} inside; found {sorted(names)}")
        cfg = yaml.safe_load(tar.extractfile(names["model_config.yaml"]).read().decode())
        weights = safe_torch_load(io.BytesIO(tar.extractfile(names["model_weights.ckpt"]).read()), str(path))
    if isinstance(weights, dict) and "state_dict" in weights:
        weights = weights["state_dict"]
    return cfg, weights


def load_nemo(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our key names) of a NeMo NEST or Wav2vec-BERT ``.nemo`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such .nemo file")
    nemo_cfg, weights = _nemo_members(path)
    state = {k: v for k, v in weights.items() if k not in DERIVED_NEMO_KEYS}
    if not is_w2vbert_nemo(nemo_cfg):
        cfg = model_config_from_nemo(nemo_cfg)
        return cfg, post_conv_keys(state) if cfg.mask_position == "post_conv" else state
    try:
        cfg = w2vbert_config_from_nemo(nemo_cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in W2VBERT_NEMO_PREFIXES if key.startswith(p)), None)
        renamed[W2VBERT_NEMO_PREFIXES[prefix] + key[len(prefix):] if prefix else key] = value
    return cfg, renamed


def build_model(cfg: ModelConfig) -> NestModel | W2vBertModel:
    """The model of ``cfg.objective``."""
    return W2vBertModel(cfg) if cfg.objective == "w2vbert" else NestModel(cfg)


@dataclass
class LoadReport:
    """What ``load_weights`` did, by parameter name."""

    loaded: list[str]  # copied into the model
    skipped: list[str]  # in the checkpoint, not selected by the include/exclude patterns

    def __str__(self) -> str:
        encoder = sum(k.startswith("encoder.") for k in self.loaded)
        return f"{len(self.loaded)} tensors loaded ({encoder} of the encoder), {len(self.skipped)} not selected"


def post_conv_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NeMo's post_conv wraps the subsampling with the masking module inside the encoder and keeps a second
    reference to the wrapper: the same tensors appear under three names. Keep ours, drop the aliases."""
    out = {}
    for k, v in state.items():
        if k.startswith("pre_encoder.") or k.startswith("encoder.pre_encode.masking."):
            continue  # aliases of encoder.pre_encode.pre_encode.* and mask_processor.*
        out[k.replace("encoder.pre_encode.pre_encode.", "encoder.pre_encode.", 1)] = v
    return out


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

    def selected(key: str) -> bool:
        inc = not include or any(fnmatch.fnmatch(key, p) for p in include)
        return inc and not any(fnmatch.fnmatch(key, p) for p in exclude)

    unknown = sorted(k for k in state if selected(k) and k not in own)
    missing = sorted(k for k in own if selected(k) and k not in state)
    shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state if selected(k) and k in own and state[k].shape != own[k].shape
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
    report = LoadReport(loaded=[k for k in state if selected(k)], skipped=[k for k in state if not selected(k)])
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
    "quantizer": ("num_classes", "num_books", "code_dim", "dist_fn"),
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


def nemo_model(path: str | Path) -> NestModel | W2vBertModel:
    """A NestModel or W2vBertModel built and loaded from a NeMo ``.nemo`` file, in eval mode."""
    cfg, state = load_nemo(path)
    model = build_model(cfg)
    load_weights(model, state, str(path))
    return model.eval()


def save_model(model: NestModel | W2vBertModel, path: str | Path) -> None:
    """Our standalone checkpoint: the model config as plain data and the state dict."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model_config": asdict(model.cfg), "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)


def model_config_from_dict(d: dict) -> ModelConfig:
    """ModelConfig from the plain dict stored in our checkpoints."""
    try:
        return ModelConfig(
            preset=d.get("preset"),
            preprocessor=PreprocessorConfig(**d["preprocessor"]),
            masking=MaskingConfig(**d["masking"]),
            quantizer=QuantizerConfig(**d["quantizer"]),
            encoder=EncoderConfig(**d["encoder"]),
            decoder_use_bias=d["decoder_use_bias"],
            mask_threshold=d["mask_threshold"],
            # Checkpoints older than the w2vbert objective are NEST's.
            objective=d.get("objective", "nest"),
            targets=d.get("targets", "random_projection"),
            w2vbert=W2vBertConfig(**d.get("w2vbert", {})),
            mask_position=d.get("mask_position", "pre_conv"),
            compile=d.get("compile", False),
        )
    except (KeyError, TypeError) as e:
        raise ConfigError(f"model config in checkpoint is not of this version: {e}") from None


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
    path = Path(path)
    if path.suffix == ".nemo":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such .nemo file")
        nemo = _nemo_members(path)[0]
        return w2vbert_config_from_nemo(nemo) if is_w2vbert_nemo(nemo) else model_config_from_nemo(nemo)
    return load_state(path)[0]


def load_model(path: str | Path) -> NestModel:
    """A model from our checkpoint (``save_model`` or a Lightning .ckpt of train.py) or a ``.nemo`` file, in eval mode."""
    cfg, state = load_state(path)
    model = build_model(cfg)
    load_weights(model, state, str(path))
    return model.eval()
