"""Checkpoints in and out: NeMo ``.nemo`` files and our own, always loaded as data, never as code."""
from __future__ import annotations

import fnmatch
import io
import math
import pickle
import tarfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from nest.config import ConfigError, EncoderConfig, MaskingConfig, ModelConfig, PreprocessorConfig, QuantizerConfig
from nest.model import NestModel

# Buffers that NeMo stores and we derive from the config.
DERIVED_NEMO_KEYS = ("preprocessor.featurizer.window", "preprocessor.featurizer.fb")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


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


# NeMo options that .nemo loading refuses, with the values it accepts and why. Options not listed are
# mapped (see model_config_from_nemo) or have no effect on NEST's numerics (squeeze_single, spec_augment,
# pos_emb_max_len, use_pytorch_sdpa*, sync_max_audio_length, global_tokens_spacing, global_attn_separate,
# rng, nb_max_freq, the deprecated use_torchaudio/stft_exact_pad/stft_conv, masking.mask_value (the
# stored embedding is loaded), masking.max_mask_ratio (unused by NeMo 3.0.0's overlapping masking)).
NEMO_REFUSED = [
    ("preprocessor", "normalize", ["per_feature"], "other feature normalizations are not implemented"),
    ("preprocessor", "window", ["hann"], "other STFT windows are not implemented"),
    ("preprocessor", "frame_splicing", [1], "frame stacking in the preprocessor is not implemented"),
    ("preprocessor", "log", [True], "only log-mel features are implemented"),
    ("preprocessor", "log_zero_guard_type", ["add"], "only the additive log guard is implemented"),
    ("preprocessor", "exact_pad", [False], "exact STFT padding (other frame counts) is not implemented"),
    ("preprocessor", "pad_value", [0], "frames added by pad_to are zeros here"),
    ("preprocessor", "mag_power", [2.0], "only the power spectrum is implemented"),
    ("preprocessor", "nb_augmentation_prob", [0.0], "narrowband augmentation in the preprocessor is not implemented"),
    ("preprocessor", "mel_norm", ["slaney"], "only the Slaney-normalized mel filterbank is implemented"),
    ("preprocessor", "lowfreq", [0], "only the full-band filterbank (0 Hz to sample_rate / 2) is implemented"),
    ("preprocessor", "highfreq", [None], "only the full-band filterbank (0 Hz to sample_rate / 2) is implemented"),
    ("masking", "allow_overlap", [True], "NeMo's non-overlapping block masking (another law) is not implemented"),
    ("masking", "freeze", [True], "the mask embedding is frozen here, as in NeMo's NEST recipe"),
    ("quantizer", "freeze", [True], "a trainable quantizer is not BEST-RQ's random projection"),
    ("quantizer", "time_ahead", [False], "NEST feeds the quantizer (B, D, T)"),
    ("encoder", "subsampling", ["dw_striding"], "only FastConformer's dw_striding subsampling is implemented"),
    ("encoder", "self_attention_model", ["rel_pos"], "absolute and local attention are not implemented"),
    ("encoder", "untie_biases", [True], "positional biases shared by all layers are not implemented"),
    ("encoder", "causal_downsampling", [False], "causal subsampling (streaming) is not implemented"),
    ("encoder", "feat_out", [-1, None], "an encoder output projection is not implemented"),
    ("encoder", "att_context_size", [[-1, -1], None], "limited or multiple attention contexts (streaming) are not implemented"),
    ("encoder", "att_context_probs", [None], "multiple attention contexts (streaming) are not implemented"),
    ("encoder", "att_chunk_context_size", [None], "chunked attention (streaming) is not implemented"),
    ("encoder", "att_context_style", ["regular"], "chunked attention (streaming) is not implemented"),
    ("encoder", "conv_context_style", ["regular"], "dynamic chunked convolution is not implemented"),
    ("encoder", "conv_norm_type", ["batch_norm", "layer_norm"], "group norm in the convolution module is not implemented"),
    ("encoder", "reduction", [None], "time reduction inside the layer stack is not implemented"),
    ("encoder", "global_tokens", [0], "global tokens (local attention) are not implemented"),
]


def _check_nemo_options(nemo: dict) -> None:
    for section, key, allowed, why in NEMO_REFUSED:
        values = nemo.get(section) or {}
        if key in values and values[key] not in allowed:
            raise CheckpointError(f"{section}.{key}={values[key]!r} is not supported: {why} (supported: {allowed})")
    enc = nemo.get("encoder") or {}
    k = int(enc.get("conv_kernel_size", EncoderConfig().conv_kernel_size))
    if enc.get("conv_context_size") not in (None, [(k - 1) // 2, (k - 1) // 2]):
        raise CheckpointError(f"encoder.conv_context_size={enc['conv_context_size']!r} is not supported: causal or "
                              f"asymmetric convolution context (streaming) is not implemented")


def _log_zero_guard(value) -> float:
    """NeMo's log_zero_guard_value: a number, or 'tiny' / 'eps' of float32."""
    if value in ("tiny", "eps"):
        return float(getattr(torch.finfo(torch.float32), value))
    return float(value)


def model_config_from_nemo(nemo: dict) -> ModelConfig:
    """Map a NeMo EncDecDenoiseMaskedTokenPredModel config onto ours, refusing what we do not implement."""
    _check_nemo_options(nemo)
    pre, enc, q = nemo.get("preprocessor", {}), nemo.get("encoder", {}), nemo.get("quantizer", {})
    mask, dec, loss = nemo.get("masking", {}), nemo.get("decoder", {}), nemo.get("loss", {})
    mask_position = nemo.get("mask_position", "pre_conv")
    if mask_position not in ("pre_conv", "post_conv"):
        raise CheckpointError(f"mask_position={mask_position!r} is not supported (supported: pre_conv, post_conv)")
    p = PreprocessorConfig()
    sample_rate = int(pre.get("sample_rate", nemo.get("sample_rate", p.sample_rate)))
    window_size, window_stride = float(pre.get("window_size", p.window_size)), float(pre.get("window_stride", p.window_stride))
    if pre.get("n_window_size"):  # NeMo's sizes in samples take precedence over seconds
        window_size = int(pre["n_window_size"]) / sample_rate
    if pre.get("n_window_stride"):
        window_stride = int(pre["n_window_stride"]) / sample_rate
    n_fft = pre.get("n_fft", p.n_fft)
    preprocessor = PreprocessorConfig(
        sample_rate=sample_rate,
        window_size=window_size,
        window_stride=window_stride,
        features=int(pre.get("features", p.features)),
        # NeMo's default n_fft: the next power of two of the window
        n_fft=int(n_fft) if n_fft else 2 ** math.ceil(math.log2(int(window_size * sample_rate))),
        preemph=float(pre.get("preemph", p.preemph)),
        log_zero_guard_value=_log_zero_guard(pre.get("log_zero_guard_value", p.log_zero_guard_value)),
        dither=float(pre.get("dither", p.dither)),
        pad_to=int(pre.get("pad_to", p.pad_to)),
    )
    e = EncoderConfig()
    d_model = int(enc.get("d_model", e.d_model))
    channels = int(enc.get("subsampling_conv_channels", e.subsampling_conv_channels))
    encoder = EncoderConfig(**{
        **{k: type(v)(enc[k]) for k, v in asdict(e).items() if k in enc and enc[k] is not None},
        "d_model": d_model,
        "subsampling_conv_channels": d_model if channels == -1 else channels,
    })
    if int(enc.get("feat_in", preprocessor.features)) != preprocessor.features:
        raise CheckpointError(f"encoder.feat_in={enc['feat_in']} differs from preprocessor.features={preprocessor.features}")
    post_conv = mask_position == "post_conv"
    # post_conv: NeMo rewrites its config before saving it: feat_in of quantizer and masking become
    # d_model, loss.combine_time_steps 1 and masking.block_size is divided by the subsampling factor.
    expected_combine = 1 if post_conv else encoder.subsampling_factor
    for section, values in (("quantizer", q), ("loss", loss)):
        combine = int(values.get("combine_time_steps", expected_combine))
        if combine != expected_combine:
            raise CheckpointError(
                f"{section}.combine_time_steps={combine} must be {expected_combine} with mask_position={mask_position}"
                + (": with another value NeMo's targets are not aligned with its predictions" if post_conv else "")
            )
    quantizer = QuantizerConfig(**{k: type(v)(q[k]) for k, v in asdict(QuantizerConfig()).items() if k in q})
    masking = MaskingConfig(**{k: type(v)(mask[k]) for k, v in asdict(MaskingConfig()).items() if k in mask})
    if post_conv:
        masking.block_size *= encoder.subsampling_factor  # ours counts mel frames, as NeMo's YAML does
    return ModelConfig(
        preprocessor=preprocessor,
        masking=masking,
        quantizer=quantizer,
        encoder=encoder,
        decoder_use_bias=bool(dec.get("use_bias", True)),
        mask_threshold=float(loss.get("mask_threshold", 0.8)),
        mask_position=mask_position,
    )


def load_nemo(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our key names) of a NeMo NEST ``.nemo`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such .nemo file")
    nemo_cfg, weights = _nemo_members(path)
    cfg = model_config_from_nemo(nemo_cfg)
    state = {k: v for k, v in weights.items() if k not in DERIVED_NEMO_KEYS}
    if cfg.mask_position == "post_conv":
        state = post_conv_keys(state)
    return cfg, state


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
    model: NestModel, state: dict[str, torch.Tensor], name: str, include=(), exclude=(), strict: bool = True
) -> list[str]:
    """Copy matching tensors of ``state`` into ``model``; report unknown, missing or mis-shaped keys by name.

    ``include``/``exclude`` are fnmatch patterns on parameter names (e.g. ``encoder.*``). With
    ``strict``, any missing or unknown key among the selected ones is an error; returns the loaded keys.
    """
    own = model.state_dict()

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
        problems.append(f"unknown keys: {', '.join(unknown)}")
    if missing and strict:
        problems.append(f"missing keys: {', '.join(missing)}")
    if shape:
        problems.append(f"shape mismatch: {'; '.join(shape)}")
    if problems and strict:
        raise CheckpointError(f"{name}: " + " | ".join(problems))
    loaded = [k for k in state if selected(k) and k in own and state[k].shape == own[k].shape]
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(state[k])
    return loaded


def nemo_model(path: str | Path) -> NestModel:
    """A NestModel built and loaded from a NeMo ``.nemo`` file, in eval mode."""
    cfg, state = load_nemo(path)
    model = NestModel(cfg)
    load_weights(model, state, str(path))
    return model.eval()


def save_model(model: NestModel, path: str | Path) -> None:
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
            mask_position=d.get("mask_position", "pre_conv"),
            compile=d.get("compile", False),
        )
    except (KeyError, TypeError) as e:
        raise ConfigError(f"model config in checkpoint is not of this version: {e}") from None


def load_model(path: str | Path) -> NestModel:
    """A NestModel from our checkpoint (``save_model`` or a Lightning .ckpt of train.py) or a ``.nemo`` file."""
    path = Path(path)
    if path.suffix == ".nemo":
        return nemo_model(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    ckpt = safe_torch_load(path, str(path))
    if "model_config" in ckpt:
        cfg, state = ckpt["model_config"], ckpt["state_dict"]
    elif "hyper_parameters" in ckpt and "model_config" in ckpt["hyper_parameters"]:
        cfg = ckpt["hyper_parameters"]["model_config"]
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        raise CheckpointError(f"{path}: neither a checkpoint of this project nor a .nemo file")
    model = NestModel(model_config_from_dict(cfg))
    load_weights(model, state, str(path))
    return model.eval()
