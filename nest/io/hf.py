"""The Hugging Face adapter: our encoder as transformers' Parakeet (``ParakeetEncoder`` and
``ParakeetFeatureExtractor``, transformers 5), every key and config mapping in one place.

Parakeet is NeMo's FastConformer (dw_striding subsampling, Transformer-XL attention with per-layer biases,
batch-norm convolution module) and its log-mel front end; what it cannot express is refused with the
setting's name (``parakeet_refusals``). transformers is imported only to write the folder (the ``hf`` extra).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from nest.errors import CheckpointError
from nest.objectives.config import ModelConfig

# Ours (NeMo's names) -> ParakeetEncoder's, applied in order to the keys of encoder.* without that prefix.
PARAKEET_KEYS = [
    (r"^pre_encode\.conv\.", "subsampling.layers."),
    (r"^pre_encode\.out\.", "subsampling.linear."),
    (r"\.conv\.batch_norm\.", ".conv.norm."),
    (r"\.self_attn\.linear_q\.", ".self_attn.q_proj."),
    (r"\.self_attn\.linear_k\.", ".self_attn.k_proj."),
    (r"\.self_attn\.linear_v\.", ".self_attn.v_proj."),
    (r"\.self_attn\.linear_out\.", ".self_attn.o_proj."),
    (r"\.self_attn\.linear_pos\.", ".self_attn.relative_k_proj."),
    (r"\.self_attn\.pos_bias_u$", ".self_attn.bias_u"),
    (r"\.self_attn\.pos_bias_v$", ".self_attn.bias_v"),
]
# ParakeetFeatureExtractor hard-codes these (feature_extraction_parakeet.py: LOG_ZERO_GUARD_VALUE).
PARAKEET_LOG_ZERO_GUARD = 2**-24


def _subsampled_bins(features: int, factor: int) -> tuple[int, int]:
    """Mel bins after the subsampling: ours (NeMo's, each stride-2 conv rounds up) and Parakeet's (floor)."""
    ours = features
    for _ in range(factor.bit_length() - 1):
        ours = (ours - 1) // 2 + 1
    return ours, features // factor


def parakeet_refusals(cfg: ModelConfig) -> None:
    """Raise CheckpointError naming the first setting Parakeet cannot express."""
    p, e = cfg.preprocessor, cfg.encoder
    ours, theirs = _subsampled_bins(p.features, e.subsampling_factor)
    problems = [
        (e.conv_norm_type != "batch_norm", f"model.encoder.conv_norm_type={e.conv_norm_type}",
         "Parakeet's convolution module has batch norm only"),
        (not e.untie_biases, "model.encoder.untie_biases=False",
         "this project's encoder always has per-layer positional biases, whatever the config says"),
        (ours != theirs, f"model.preprocessor.features={p.features}",
         f"Parakeet's subsampling output has features // {e.subsampling_factor} = {theirs} bins, ours {ours} "
         f"(give a multiple of {e.subsampling_factor})"),
        (p.log_zero_guard_value != PARAKEET_LOG_ZERO_GUARD, f"model.preprocessor.log_zero_guard_value={p.log_zero_guard_value}",
         "ParakeetFeatureExtractor adds 2**-24 before the log, always"),
        (p.n_fft % 2 == 1, f"model.preprocessor.n_fft={p.n_fft}",
         "ParakeetFeatureExtractor counts frames as (samples + n_fft // 2 * 2 - n_fft) // hop: one fewer for odd n_fft"),
    ]
    for bad, setting, why in problems:
        if bad:
            raise CheckpointError(f"{setting} cannot be exported to Hugging Face Parakeet: {why}")


def parakeet_encoder_config(cfg: ModelConfig) -> dict:
    """ParakeetEncoderConfig's fields. Dropouts map where Parakeet has the same one (its ``dropout`` is our
    dropout_pre_encoder, ``activation_dropout`` the feed-forward one); see ``training_differences``."""
    parakeet_refusals(cfg)
    e = cfg.encoder
    return {
        "hidden_size": e.d_model, "num_hidden_layers": e.n_layers, "num_attention_heads": e.n_heads,
        # transformers' own NeMo converter leaves intermediate_size at its default (4096 = 1024 x 4).
        "intermediate_size": e.d_model * e.ff_expansion_factor, "hidden_act": "silu",
        "attention_bias": e.use_bias, "convolution_bias": e.use_bias, "conv_kernel_size": e.conv_kernel_size,
        "subsampling_factor": e.subsampling_factor, "subsampling_conv_channels": e.subsampling_conv_channels,
        "num_mel_bins": cfg.preprocessor.features, "subsampling_conv_kernel_size": 3, "subsampling_conv_stride": 2,
        "dropout": e.dropout_pre_encoder, "dropout_positions": e.dropout_emb, "layerdrop": 0.0,
        "activation_dropout": e.dropout, "attention_dropout": e.dropout_att, "scale_input": e.xscaling,
    }


def parakeet_feature_extractor_config(cfg: ModelConfig) -> dict:
    """ParakeetFeatureExtractor's arguments: NeMo's log-mel front end without dither and pad_to."""
    p = cfg.preprocessor
    return {"feature_size": p.features, "sampling_rate": p.sample_rate, "hop_length": int(p.window_stride * p.sample_rate),
            "n_fft": p.n_fft, "win_length": int(p.window_size * p.sample_rate), "preemphasis": p.preemph,
            "padding_value": 0.0}


def training_differences(cfg: ModelConfig) -> list[str]:
    """What fine-tuning in transformers does differently from ours (outputs in eval mode are the same)."""
    e, p = cfg.encoder, cfg.preprocessor
    notes = [f"dropout: Parakeet has no dropout on the residual branches (ours: {e.dropout}); "
             f"activation_dropout={e.dropout}, attention_dropout={e.dropout_att}, dropout (after the subsampling)="
             f"{e.dropout_pre_encoder}"]
    if e.stochastic_depth_drop_prob > 0:
        notes.append(f"stochastic depth ({e.stochastic_depth_mode}, {e.stochastic_depth_drop_prob}) is not exported: "
                     f"Parakeet's layerdrop is uniform, not rescaled; layerdrop=0.0 (set it when fine-tuning)")
    if p.dither > 0:
        notes.append(f"dither ({p.dither}): ParakeetFeatureExtractor adds none")
    return notes


def parakeet_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder.* tensors of our state dict under ParakeetEncoder's names."""
    out = {}
    for key, value in state.items():
        if not key.startswith("encoder."):
            continue
        name = key[len("encoder."):]
        for pattern, repl in PARAKEET_KEYS:
            name = re.sub(pattern, repl, name)
        out[name] = value
    return out


def write_parakeet(cfg: ModelConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """config.json, model.safetensors and preprocessor_config.json of a ParakeetEncoder into ``folder``.

    The tensors are loaded into transformers' own ParakeetEncoder with strict loading before it saves them.
    """
    try:
        from transformers import ParakeetEncoder, ParakeetEncoderConfig, ParakeetFeatureExtractor
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise CheckpointError("--format hf needs transformers 5 (pip install '.[hf]')") from None
    config = ParakeetEncoderConfig(**parakeet_encoder_config(cfg))
    with torch.device("meta"):
        encoder = ParakeetEncoder(config)
    weights = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in parakeet_state_dict(state).items()}
    result = encoder.load_state_dict(weights, strict=True, assign=True)
    if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"Parakeet's encoder does not take these tensors: {result}")
    # The positional frequencies are a non-persistent buffer, left on the meta device: rebuild them.
    encoder.encode_positions.inv_freq = \
        encoder.encode_positions.compute_default_relative_positional_parameters(config)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per file written: noise in a command's output
    try:
        encoder.eval().save_pretrained(folder)
        ParakeetFeatureExtractor(**parakeet_feature_extractor_config(cfg)).save_pretrained(folder)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
