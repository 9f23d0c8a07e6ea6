"""The NeMo adapter: every NeMo key and config mapping, both ways. A ``.nemo`` file (a tar of model_config.yaml
and model_weights.ckpt) read as data, NeMo's model configs mapped onto ours (refusing, with the reason, what we
do not implement) and NeMo's state-dict names onto ours; for export, ours onto NeMo 3.0.0's (``to_nemo_config``,
``to_nemo_state_dict``)."""
from __future__ import annotations

import io
import math
import tarfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import yaml

from nest.errors import CheckpointError, ConfigError
from nest.io.torch_file import safe_torch_load
from nest.model.conformer import EncoderConfig
from nest.model.features import PreprocessorConfig
from nest.model.masking import MaskingConfig
from nest.model.quantizer import QuantizerConfig
from nest.objectives.config import ModelConfig, W2vBertConfig, validate_w2vbert

# Buffers that NeMo stores and we derive from the config.
DERIVED_NEMO_KEYS = ("preprocessor.featurizer.window", "preprocessor.featurizer.fb")


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


def _require(section: dict, key: str, allowed: Iterable[Any], where: str) -> None:
    if key in section and section[key] not in allowed:
        raise CheckpointError(f"{where}.{key}={section[key]!r} is not supported here (supported: {list(allowed)})")


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


# NeMo's SpeechEncDecSelfSupervisedModel names -> ours (W2vBertModel); encoder keys are the same.
W2VBERT_NEMO_PREFIXES = {
    "decoder_losses.contrastive.decoder.": "contrastive_decoder.",
    "decoder_losses.contrastive.loss.quantizer.": "quantizer.",
    "decoder_losses.contrastive.loss.target_proj.": "target_proj.",
    "decoder_losses.mlm.decoder.": "mlm_decoder.",
}


def _target(section: dict, cls: str, where: str) -> None:
    target = str(section.get("_target_", cls))
    if target.rsplit(".", 1)[-1] != cls:
        raise CheckpointError(f"{where}._target_={target!r} is not supported here (only {cls})")


def _loss_entry(losses: dict, name: str) -> dict:
    """One entry of NeMo's loss_list, refusing the options we do not implement."""
    entry = losses[name]
    for key, allowed in (("output_from_layer", [None]), ("transpose_encoded", [False])):
        _require(entry, key, allowed, f"loss_list.{name}")
    if name == "contrastive":
        _require(entry, "start_step", [0], "loss_list.contrastive")
    return entry


def w2vbert_config_from_nemo(nemo: dict) -> ModelConfig:
    """Map a NeMo SpeechEncDecSelfSupervisedModel config onto ours, refusing what we do not implement.

    Preprocessor and encoder map as NEST's; absent keys take the defaults of NeMo's classes.
    """
    losses = nemo.get("loss_list") or {}
    if not losses:
        raise CheckpointError("model: SpeechEncDecSelfSupervisedModel without loss_list (one decoder_ssl and "
                              "loss) is not supported; only loss_list with contrastive [+ mlm]")
    active = [k for k, v in losses.items() if v.get("is_active", True)]
    if "contrastive" not in active or set(active) - {"contrastive", "mlm"}:
        raise CheckpointError(f"loss_list: active losses {active} are not supported (contrastive, optionally mlm)")
    for key in ("dropout_features", "dropout_features_q", "feature_penalty"):
        if nemo.get(key):
            raise CheckpointError(f"model.{key}={nemo[key]!r} is not supported here")
    spec = nemo.get("spec_augment") or {}
    _target(spec, "MaskedPatchAugmentation", "spec_augment")
    c = _loss_entry(losses, "contrastive")
    cdec, closs = c.get("decoder", {}), c.get("loss", {})
    _target(cdec, "ConvASRDecoderReconstruction", "loss_list.contrastive.decoder")
    _target(closs, "ContrastiveLoss", "loss_list.contrastive.loss")
    where = "loss_list.contrastive."
    for key, allowed in (("stride_layers", [0]), ("non_stride_layers", [0]), ("activation", ["relu"]),
                         ("apply_softmax", [False])):
        _require(cdec, key, allowed, where + "decoder")
    for key, allowed in (("sample_from_same_utterance_only", [True]), ("sample_from_non_masked", [False]),
                         ("reduce_ids", [False])):
        _require(closs, key, allowed, where + "loss")
    base = model_config_from_nemo(nemo)
    factor, features = base.encoder.subsampling_factor, base.preprocessor.features
    proj_dim = int(closs.get("proj_dim", 128))
    sizes = {"decoder.feat_hidden": cdec.get("feat_hidden", proj_dim), "decoder.feat_out": cdec.get("feat_out", proj_dim)}
    for key, value in sizes.items():
        if int(value) != proj_dim:
            raise CheckpointError(f"{where}{key}={value} must equal loss.proj_dim={proj_dim} here")
    if int(closs.get("in_dim", features)) != features or int(closs.get("combine_time_steps", 1)) != factor:
        raise CheckpointError(f"{where}loss: in_dim must be preprocessor.features={features} and "
                              f"combine_time_steps the subsampling factor {factor}")
    mlm = "mlm" in active
    w = W2vBertConfig(
        patch_size=int(spec.get("patch_size", 48)),
        mask_patches=float(spec.get("mask_patches", 10.0)),
        freq_masks=int(spec.get("freq_masks", 0)),
        freq_width=int(spec.get("freq_width", 0)),
        decoder_out=proj_dim,
        quantized_targets=bool(closs.get("quantized_targets", False)),
        codebook_size=int(closs.get("codebook_size", 320)),
        num_groups=int(closs.get("num_groups", 2)),
        num_negatives=int(closs.get("num_negatives", 100)),
        logit_temp=float(closs.get("logit_temp", 0.1)),
        prob_ppl_weight=float(closs.get("prob_ppl_weight", 0.1)),
        reduce=str(closs.get("reduce", "sum")),
        multiplier=float(closs.get("multiplier", 16.0)),
        quantizer_temp_start=float(closs.get("quantizer_temp_start", 2.0)),
        quantizer_temp_min=float(closs.get("quantizer_temp_min", 0.5)),
        quantizer_temp_decay=float(closs.get("quantizer_temp_decay", 0.999995)),
        mask_threshold=float(closs.get("mask_threshold", 0.8)),
        contrastive_alpha=float(c.get("loss_alpha", 1.0)),
        mlm=mlm,
    )
    if mlm:
        m = _loss_entry(losses, "mlm")
        mdec, mloss = m.get("decoder", {}), m.get("loss", {})
        where = "loss_list.mlm."
        _target(mdec, "ConvASRDecoder", where + "decoder")
        _target(mloss, "MLMLoss", where + "loss")
        _require(m, "targets_from_loss", ["contrastive"], "loss_list.mlm")
        _require(closs, "store_ids", [True], "loss_list.contrastive.loss")
        _require(mdec, "add_blank", [True], where + "decoder")
        _require(mdec, "vocabulary", [None], where + "decoder")
        _require(mdec, "num_classes", [w.codebook_size**w.num_groups], where + "decoder")
        # Absent keys take MLMLoss's defaults, which must agree with the contrastive loss's steps too.
        mloss = {"combine_time_steps": 1, "mask_threshold": 0.8, **mloss}
        _require(mloss, "combine_time_steps", [factor], where + "loss")
        _require(mloss, "mask_threshold", [w.mask_threshold], where + "loss")
        w = replace(w, mlm_alpha=float(m.get("loss_alpha", 1.0)), mlm_start_step=int(m.get("start_step", 0)))
    try:
        validate_w2vbert(w, features)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return replace(base, objective="w2vbert", w2vbert=w)


def is_w2vbert_nemo(nemo: dict) -> bool:
    """Whether a NeMo model config is a SpeechEncDecSelfSupervisedModel (Wav2vec-BERT-style)."""
    return str(nemo.get("target", "")).endswith("SpeechEncDecSelfSupervisedModel") or "loss_list" in nemo


def read_nemo(path: Path) -> tuple[dict, dict]:
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


def post_conv_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NeMo's post_conv wraps the subsampling with the masking module inside the encoder and keeps a second
    reference to the wrapper: the same tensors appear under three names. Keep ours, drop the aliases."""
    out = {}
    for k, v in state.items():
        if k.startswith("pre_encoder.") or k.startswith("encoder.pre_encode.masking."):
            continue  # aliases of encoder.pre_encode.pre_encode.* and mask_processor.*
        out[k.replace("encoder.pre_encode.pre_encode.", "encoder.pre_encode.", 1)] = v
    return out


def load_nemo(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our key names) of a NeMo NEST or Wav2vec-BERT ``.nemo`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such .nemo file")
    nemo_cfg, weights = read_nemo(path)
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


def nemo_model_config(path: str | Path) -> ModelConfig:
    """The model configuration of a ``.nemo`` file (its tensors are read but not kept)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such .nemo file")
    nemo = read_nemo(path)[0]
    return w2vbert_config_from_nemo(nemo) if is_w2vbert_nemo(nemo) else model_config_from_nemo(nemo)


# ---- Export: our models as NeMo 3.0.0 writes them (model_config.yaml and model_weights.ckpt of a .nemo) ----

NEMO_CLASSES = {
    "nest": "nemo.collections.asr.models.ssl_models.EncDecDenoiseMaskedTokenPredModel",
    "w2vbert": "nemo.collections.asr.models.ssl_models.SpeechEncDecSelfSupervisedModel",
}
_MODULES, _LOSSES = "nemo.collections.asr.modules.", "nemo.collections.asr.losses."


def _non_default(values: dict, defaults: dict) -> dict:
    """The entries of ``values`` that differ from NeMo's constructor defaults (NeMo's YAMLs leave those out)."""
    return {k: v for k, v in values.items() if v != defaults[k]}


def _preprocessor_section(p: PreprocessorConfig) -> dict:
    return {
        "_target_": _MODULES + "AudioToMelSpectrogramPreprocessor", "sample_rate": p.sample_rate,
        "normalize": "per_feature", "window_size": p.window_size, "window_stride": p.window_stride, "window": "hann",
        "features": p.features, "n_fft": p.n_fft, "log": True, "frame_splicing": 1, "dither": p.dither,
        "pad_to": p.pad_to, "pad_value": 0.0,
        **_non_default({"preemph": p.preemph, "log_zero_guard_value": p.log_zero_guard_value},
                       {"preemph": 0.97, "log_zero_guard_value": 2**-24}),
    }


def _encoder_section(cfg: ModelConfig) -> dict:
    """NeMo's ConformerEncoder section with the keys of NeMo's recipe YAML of the objective."""
    e, nest = cfg.encoder, cfg.objective == "nest"
    if not e.untie_biases:
        raise CheckpointError("model.encoder.untie_biases=False cannot be exported: this project's encoder always has "
                              "per-layer positional biases (NeMo's untie_biases=true), whatever the config says")
    return {
        "_target_": _MODULES + "ConformerEncoder", "feat_in": cfg.preprocessor.features, "feat_out": -1,
        "n_layers": e.n_layers, "d_model": e.d_model, "use_bias": e.use_bias, "subsampling": "dw_striding",
        "subsampling_factor": e.subsampling_factor, "subsampling_conv_channels": e.subsampling_conv_channels,
        "causal_downsampling": False,
        **({} if nest else {"reduction": None, "reduction_position": None, "reduction_factor": 1}),
        "ff_expansion_factor": e.ff_expansion_factor, "self_attention_model": "rel_pos", "n_heads": e.n_heads,
        "att_context_size": [-1, -1], **({"att_context_style": "regular"} if nest else {}),
        "xscaling": e.xscaling, "untie_biases": True, "pos_emb_max_len": 5000, "conv_kernel_size": e.conv_kernel_size,
        "conv_norm_type": e.conv_norm_type, "conv_context_size": None, "dropout": e.dropout,
        "dropout_pre_encoder": e.dropout_pre_encoder, "dropout_emb": e.dropout_emb, "dropout_att": e.dropout_att,
        "stochastic_depth_drop_prob": e.stochastic_depth_drop_prob, "stochastic_depth_mode": e.stochastic_depth_mode,
        "stochastic_depth_start_layer": e.stochastic_depth_start_layer,
        # -1 (never split) is left at NeMo's 1 (split past 2^31 elements): NeMo 3.0.0's subsampling fails with -1
        # (it calls its masked convolutions without lengths). The split changes no number.
        **_non_default({"subsampling_conv_chunking_factor": max(e.subsampling_conv_chunking_factor, 1)},
                       {"subsampling_conv_chunking_factor": 1}),
    }


def nemo_optim_section(optim: dict, d_model: int) -> dict:
    """Our optimizer settings (OptimConfig as a dict) as NeMo's AdamW + NoamAnnealing section."""
    return {"name": "adamw", "lr": optim["lr"], "betas": list(optim["betas"]), "weight_decay": optim["weight_decay"],
            "sched": {"name": "NoamAnnealing", "d_model": d_model, "warmup_steps": optim["warmup_steps"],
                      "warmup_ratio": None, "min_lr": optim["min_lr"]}}


def _nest_sections(cfg: ModelConfig) -> dict:
    q, enc, post_conv = cfg.quantizer, cfg.encoder, cfg.mask_position == "post_conv"
    if cfg.targets != "random_projection":
        raise CheckpointError(f"model.targets={cfg.targets} cannot be exported to NeMo: its NEST model has no "
                              f"k-means targets (export the encoder with --format hf, or fine-tune from ours)")
    if q.norm != "none":
        raise CheckpointError(f"model.quantizer.norm={q.norm} cannot be exported to NeMo: NeMo 3.0.0's quantizer has "
                              f"no norm (export the encoder with --format hf, or fine-tune from ours)")
    # post_conv: the config as NeMo's constructor rewrites it before saving (see model_config_from_nemo).
    feat_in = enc.d_model if post_conv else cfg.preprocessor.features
    combine = 1 if post_conv else enc.subsampling_factor
    block_size = cfg.masking.block_size // enc.subsampling_factor if post_conv else cfg.masking.block_size
    return {
        "sample_rate": cfg.preprocessor.sample_rate, "num_classes": q.num_classes, "num_books": q.num_books,
        "code_dim": q.code_dim, "squeeze_single": False, "mask_position": cfg.mask_position,
        "preprocessor": _preprocessor_section(cfg.preprocessor),
        "spec_augment": {"_target_": _MODULES + "SpectrogramAugmentation", "freq_masks": 0, "time_masks": 0,
                         "freq_width": 27, "time_width": 0.05},
        "masking": {"_target_": _MODULES + "RandomBlockMasking", "block_size": block_size,
                    "mask_prob": cfg.masking.mask_prob, "feat_in": feat_in, "freeze": True, "allow_overlap": True,
                    **_non_default({"max_mask_ratio": cfg.masking.max_mask_ratio}, {"max_mask_ratio": 0.8})},
        "quantizer": {"_target_": _MODULES + "RandomProjectionVectorQuantizer", "feat_in": feat_in,
                      "code_dim": q.code_dim, "num_books": q.num_books, "num_classes": q.num_classes,
                      "dist_fn": q.dist_fn, "freeze": True, "squeeze_single": False, "combine_time_steps": combine},
        "encoder": _encoder_section(cfg),
        "decoder": {"_target_": _MODULES + "MultiSoftmaxDecoder", "feat_in": enc.d_model, "num_classes": q.num_classes,
                    "num_decoders": q.num_books, "squeeze_single": False, "use_bias": cfg.decoder_use_bias},
        "loss": {"_target_": _LOSSES + "MultiMLMLoss", "combine_time_steps": combine,
                 "mask_threshold": cfg.mask_threshold, "num_decoders": q.num_books, "squeeze_single": False},
    }


# ContrastiveLoss's constructor defaults, for the keys NeMo's YAML leaves out.
_CONTRASTIVE_DEFAULTS = {"prob_ppl_weight": 0.1, "logit_temp": 0.1, "reduce": "sum", "quantizer_temp_start": 2.0,
                         "quantizer_temp_min": 0.5, "quantizer_temp_decay": 0.999995, "mask_threshold": 0.8,
                         "multiplier": 16.0}


def _w2vbert_sections(cfg: ModelConfig) -> dict:
    w, d_model, factor = cfg.w2vbert, cfg.encoder.d_model, cfg.encoder.subsampling_factor
    if w.quantizer_norm != "none":
        raise CheckpointError(f"model.w2vbert.quantizer_norm={w.quantizer_norm} cannot be exported to NeMo: NeMo "
                              f"3.0.0's Gumbel quantizer has no norm (export the encoder with --format hf)")
    contrastive = {
        "is_active": True,
        "decoder": {"_target_": _MODULES + "ConvASRDecoderReconstruction", "feat_in": d_model,
                    "feat_hidden": w.decoder_out, "feat_out": w.decoder_out, "stride_layers": 0, "non_stride_layers": 0},
        "loss": {"_target_": _LOSSES + "ContrastiveLoss", "in_dim": cfg.preprocessor.features,
                 "proj_dim": w.decoder_out, "combine_time_steps": factor, "quantized_targets": w.quantized_targets,
                 "codebook_size": w.codebook_size, "num_groups": w.num_groups, "num_negatives": w.num_negatives,
                 "sample_from_same_utterance_only": True, "sample_from_non_masked": False,
                 **_non_default({k: getattr(w, k) for k in _CONTRASTIVE_DEFAULTS}, _CONTRASTIVE_DEFAULTS)},
        **_non_default({"loss_alpha": w.contrastive_alpha}, {"loss_alpha": 1.0}),
    }
    losses = {"contrastive": contrastive}
    if w.mlm:
        losses["mlm"] = {
            "is_active": True,
            "decoder": {"_target_": _MODULES + "ConvASRDecoder", "feat_in": d_model,
                        "num_classes": w.codebook_size**w.num_groups},
            "loss": {"_target_": _LOSSES + "MLMLoss", "combine_time_steps": factor,
                     **_non_default({"mask_threshold": w.mask_threshold}, {"mask_threshold": 0.8})},
            "targets_from_loss": "contrastive", "loss_alpha": w.mlm_alpha, "transpose_encoded": False,
            "start_step": w.mlm_start_step, "output_from_layer": None,
        }
    return {
        "sample_rate": cfg.preprocessor.sample_rate, "preprocessor": _preprocessor_section(cfg.preprocessor),
        "spec_augment": {"_target_": _MODULES + "MaskedPatchAugmentation", "freq_masks": w.freq_masks,
                         "freq_width": w.freq_width, "patch_size": w.patch_size, "mask_patches": w.mask_patches},
        "encoder": _encoder_section(cfg), "decoder_out": w.decoder_out, "loss_list": losses,
    }


def to_nemo_config(cfg: ModelConfig, optim: dict) -> dict:
    """model_config.yaml of a .nemo: every section NeMo 3.0.0's class reads (no data sections), ``target`` last.

    Raises CheckpointError naming the setting when NeMo cannot hold the model.
    """
    sections = _w2vbert_sections(cfg) if cfg.objective == "w2vbert" else _nest_sections(cfg)
    return {**sections, "optim": nemo_optim_section(optim, cfg.encoder.d_model),
            "target": NEMO_CLASSES[cfg.objective], "nemo_version": "3.0.0"}


def nemo_filterbank(p: PreprocessorConfig) -> torch.Tensor:
    """(1, features, n_fft // 2 + 1) the mel filterbank NeMo stores (librosa's Slaney filters, float32).

    librosa rounds the triangles to float32 before scaling them; torchaudio's filters (ours) differ in the last
    bit. A .nemo carries NeMo's own, so that a NeMo-made file exports back bit for bit.
    """
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0  # the Slaney mel scale

    def hz_to_mel(f):
        return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep,
                        f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_hz / f_sp, min_log_hz * np.exp(logstep * (m - min_log_hz / f_sp)), f_sp * m)

    freqs = np.fft.rfftfreq(n=p.n_fft, d=1.0 / p.sample_rate)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(np.float64(0.0)), hz_to_mel(np.float64(p.sample_rate / 2)),
                                  p.features + 2))
    fdiff, ramps = np.diff(mel_f), np.subtract.outer(mel_f, freqs)
    weights = np.zeros((p.features, len(freqs)), dtype=np.float32)
    for i in range(p.features):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return torch.from_numpy(weights)[None]


def to_nemo_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our model's state dict under NeMo's names, in NeMo's module order, with the featurizer's buffers.

    post_conv: NeMo wraps the subsampling and the mask embedding into the encoder and keeps a second reference
    to the wrapper (``pre_encoder``): the same tensors under three names, as NeMo saves them.
    """
    p = cfg.preprocessor
    out = {"preprocessor.featurizer.window": torch.hann_window(int(p.window_size * p.sample_rate), periodic=False),
           "preprocessor.featurizer.fb": nemo_filterbank(p)}
    if cfg.objective == "w2vbert":
        ours = {v: k for k, v in W2VBERT_NEMO_PREFIXES.items()}
        prefix = lambda key: next((q for q in ours if key.startswith(q)), None)  # noqa: E731
        state = {ours[prefix(k)] + k[len(prefix(k)):] if prefix(k) else k: v for k, v in state.items()}
    part = lambda prefix: {k: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    # NeMo's subsampling registers its output projection before the convolutions.
    subsampling = dict(sorted(part("encoder.pre_encode.").items(), key=lambda kv: ".conv." in kv[0]))
    if cfg.mask_position == "post_conv":
        wrapped = {"pre_encode." + k[len("encoder.pre_encode."):]: v for k, v in subsampling.items()}
        wrapped["masking.mask_embedding"] = state["mask_processor.mask_embedding"]
        subsampling = {"encoder.pre_encode." + k: v for k, v in wrapped.items()}
    out.update(subsampling)
    out.update({k: v for k, v in part("encoder.").items() if not k.startswith("encoder.pre_encode.")})
    for prefix in ("quantizer.", "mask_processor.", "decoder.", "decoder_losses."):
        out.update(part(prefix))
    if cfg.mask_position == "post_conv":
        out.update({"pre_encoder." + k: v for k, v in wrapped.items()})
    left = sorted(k for k in state if k not in out and not k.startswith("encoder.pre_encode."))
    if left:
        raise CheckpointError(f"tensors without a NeMo name: {', '.join(left)}")
    return out
