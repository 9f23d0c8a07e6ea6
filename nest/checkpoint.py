"""Checkpoints in and out: NeMo ``.nemo`` files and our own, always loaded as data, never as code."""
from __future__ import annotations

import fnmatch
import io
import pickle
import tarfile
from dataclasses import asdict, dataclass, replace
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
    validate_w2vbert,
)
from nest.model import NestModel
from nest.w2vbert import W2vBertModel

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


def _require(section: dict, key: str, allowed: Iterable[Any], where: str) -> None:
    if key in section and section[key] not in allowed:
        raise CheckpointError(f"{where}.{key}={section[key]!r} is not supported here (supported: {list(allowed)})")


def model_config_from_nemo(nemo: dict) -> ModelConfig:
    """Map a NeMo EncDecDenoiseMaskedTokenPredModel config onto ours, refusing what we do not implement."""
    pre, enc, q = nemo.get("preprocessor", {}), nemo.get("encoder", {}), nemo.get("quantizer", {})
    mask, dec, loss = nemo.get("masking", {}), nemo.get("decoder", {}), nemo.get("loss", {})
    _require(nemo, "mask_position", ["pre_conv"], "model")
    _require(pre, "normalize", ["per_feature"], "preprocessor")
    _require(pre, "window", ["hann"], "preprocessor")
    _require(pre, "frame_splicing", [1], "preprocessor")
    _require(pre, "log", [True], "preprocessor")
    _require(mask, "allow_overlap", [True], "masking")
    _require(enc, "subsampling", ["dw_striding"], "encoder")
    _require(enc, "self_attention_model", ["rel_pos"], "encoder")
    _require(enc, "untie_biases", [True], "encoder")
    _require(enc, "causal_downsampling", [False], "encoder")
    _require(enc, "feat_out", [-1, None], "encoder")
    if list(enc.get("att_context_size", [-1, -1])) != [-1, -1]:
        raise CheckpointError(f"encoder.att_context_size={enc['att_context_size']} is not supported (only [-1, -1])")
    p = PreprocessorConfig()
    preprocessor = PreprocessorConfig(
        sample_rate=int(pre.get("sample_rate", nemo.get("sample_rate", p.sample_rate))),
        window_size=float(pre.get("window_size", p.window_size)),
        window_stride=float(pre.get("window_stride", p.window_stride)),
        features=int(pre.get("features", p.features)),
        n_fft=int(pre.get("n_fft", p.n_fft)),
        preemph=float(pre.get("preemph", p.preemph)),
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
    combine = int(q.get("combine_time_steps", encoder.subsampling_factor))
    if combine != encoder.subsampling_factor:
        raise CheckpointError(f"quantizer.combine_time_steps={combine} must equal the subsampling factor")
    quantizer = QuantizerConfig(**{k: type(v)(q[k]) for k, v in asdict(QuantizerConfig()).items() if k in q})
    masking = MaskingConfig(**{k: type(v)(mask[k]) for k, v in asdict(MaskingConfig()).items() if k in mask})
    return ModelConfig(
        preprocessor=preprocessor,
        masking=masking,
        quantizer=quantizer,
        encoder=encoder,
        decoder_use_bias=bool(dec.get("use_bias", True)),
        mask_threshold=float(loss.get("mask_threshold", 0.8)),
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


def load_nemo(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our key names) of a NeMo NEST or Wav2vec-BERT ``.nemo`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such .nemo file")
    nemo_cfg, weights = _nemo_members(path)
    state = {k: v for k, v in weights.items() if k not in DERIVED_NEMO_KEYS}
    if not is_w2vbert_nemo(nemo_cfg):
        return model_config_from_nemo(nemo_cfg), state
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
        )
    except (KeyError, TypeError) as e:
        raise ConfigError(f"model config in checkpoint is not of this version: {e}") from None


def load_state(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model config and state dict (our key names) of our checkpoint or a NeMo ``.nemo`` file, read as data."""
    path = Path(path)
    if path.suffix == ".nemo":
        return load_nemo(path)
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
