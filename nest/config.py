"""Typed configuration: dataclasses per section, merged from YAML and ``key=value`` overrides.

Unknown keys and wrong types fail at start-up with the key named and the closest valid keys
suggested, never an hour into a run.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cuts.config import DataConfig


@dataclass
class PreprocessorConfig:
    """Log-mel features as NeMo's AudioToMelSpectrogramPreprocessor computes them."""

    sample_rate: int = 16000
    window_size: float = 0.025  # seconds
    window_stride: float = 0.01  # seconds
    features: int = 80
    n_fft: int = 512
    preemph: float = 0.97
    log_zero_guard_value: float = 2**-24
    dither: float = 1e-5  # training only
    pad_to: int = 16


@dataclass
class MaskingConfig:
    """Random block masking of the (noisy) features before subsampling."""

    block_size: int = 40  # frames (10 ms each)
    mask_prob: float = 0.01  # probability that a block starts at a given frame
    max_mask_ratio: float = 0.8  # shorter utterances get one 8-frame block instead


@dataclass
class QuantizerConfig:
    """Frozen random-projection quantizer (BEST-RQ) producing the target tokens."""

    num_classes: int = 8192
    num_books: int = 1
    code_dim: int = 16
    dist_fn: str = "l2"  # l2 | cosine


@dataclass
class EncoderConfig:
    """FastConformer encoder."""

    n_layers: int = 17
    d_model: int = 512
    n_heads: int = 8
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    ff_expansion_factor: int = 4
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"  # batch_norm | layer_norm
    xscaling: bool = True
    untie_biases: bool = True
    use_bias: bool = True
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1
    stochastic_depth_drop_prob: float = 0.0
    stochastic_depth_mode: str = "linear"  # linear | uniform
    stochastic_depth_start_layer: int = 1


@dataclass
class W2vBertConfig:
    """Wav2vec-BERT-style objective (NeMo's SpeechEncDecSelfSupervisedModel): contrastive + masked LM."""

    patch_size: int = 48  # frames per masked time patch (MaskedPatchAugmentation)
    mask_patches: float = 0.5  # < 1: fraction of the shortest utterance to mask (patches rounded up); >= 1: patches
    freq_masks: int = 3  # frequency masks per utterance
    freq_width: int = 20  # frequency mask widths are drawn from [0, freq_width)
    decoder_out: int = 256  # width of the contrastive decoder's output and of the targets it is compared with
    quantized_targets: bool = True  # Gumbel quantizer targets; false: a linear projection (wav2vec 2.0 style)
    codebook_size: int = 300  # codewords per quantizer group
    num_groups: int = 2  # quantizer groups; the MLM predicts one of codebook_size ** num_groups ids
    num_negatives: int = 100  # distractors per masked step, drawn from masked steps of the same utterance
    logit_temp: float = 0.1  # cosine similarities are divided by this
    prob_ppl_weight: float = 0.1  # weight of the codebook diversity penalty (per masked step)
    reduce: str = "sum"  # sum | mean: reduction of the contrastive cross-entropy over masked steps
    multiplier: float = 16.0  # the contrastive loss is scaled by multiplier / batch size
    quantizer_temp_start: float = 2.0  # Gumbel softmax temperature at step 0
    quantizer_temp_min: float = 0.5  # lowest Gumbel temperature
    quantizer_temp_decay: float = 0.999995  # temperature = max(start * decay ** step, min)
    mask_threshold: float = 0.8  # a step counts as masked when more of its features are masked
    contrastive_alpha: float = 1.0  # weight of the contrastive loss in the total
    mlm: bool = True  # also predict the quantizer's ids at masked steps (needs quantized_targets)
    mlm_alpha: float = 1000.0  # weight of the MLM loss in the total
    mlm_start_step: int = 0  # the MLM loss counts from this training step on


@dataclass
class ModelConfig:
    """The whole NEST model. ``preset`` picks a row of NeMo's size table; other keys override it."""

    preset: Optional[str] = None  # small | medium | large | xlarge | xxlarge
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_use_bias: bool = True
    mask_threshold: float = 0.8  # a token counts as masked when more of its frames are masked
    objective: str = "nest"  # nest | w2vbert
    w2vbert: W2vBertConfig = field(default_factory=W2vBertConfig)  # used when objective=w2vbert


@dataclass
class OptimConfig:
    """AdamW with Noam annealing, NeMo's NEST defaults."""

    lr: float = 5.0  # scaled by d_model^-0.5 and the Noam schedule
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 1e-3
    warmup_steps: int = 25000
    min_lr: float = 1e-6


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Optional[str] = None  # None: bf16-mixed on GPU, 32 on CPU
    max_steps: int = 500000
    val_check_interval: int = 2500  # steps
    limit_val_batches: Optional[int] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 2500
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    enable_progress_bar: bool = True
    sync_batchnorm: bool = True
    logger: str = "tensorboard"  # tensorboard | wandb (pip install '.[wandb]')
    wandb_project: Optional[str] = None


@dataclass
class RunConfig:
    """Everything train.py reads."""

    exp_dir: str = "exp/nest"
    seed: int = 42
    resume: Optional[str] = None  # auto | PATH
    init_from: Optional[str] = None  # our checkpoint or a NeMo .nemo file
    init_include: List[str] = field(default_factory=list)  # fnmatch patterns on parameter names
    init_exclude: List[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# The size table atop NeMo's nest_fast-conformer.yaml.
PRESETS = {
    "small": dict(d_model=176, n_heads=4, n_layers=16, conv_kernel_size=9, xscaling=True, use_bias=True),
    "medium": dict(d_model=256, n_heads=4, n_layers=16, conv_kernel_size=9, xscaling=True, use_bias=True),
    "large": dict(d_model=512, n_heads=8, n_layers=17, conv_kernel_size=9, xscaling=True, use_bias=True),
    "xlarge": dict(d_model=1024, n_heads=8, n_layers=24, conv_kernel_size=9, xscaling=False, use_bias=False),
    "xxlarge": dict(d_model=1024, n_heads=8, n_layers=42, conv_kernel_size=5, xscaling=False, use_bias=False),
}
PRESET_WEIGHT_DECAY = {"small": 0.0}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def model_preset(name: str) -> ModelConfig:
    """The ModelConfig of one row of NeMo's size table."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is not a preset; choose one of {sorted(PRESETS)}")
    return ModelConfig(preset=name, encoder=EncoderConfig(**PRESETS[name]))


def _check_keys(raw: Any, schema: type, prefix: str) -> None:
    """Reject keys that the dataclass ``schema`` does not have, suggesting the closest ones."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in hints:
            candidates = [f"{prefix}{name}" for name in hints]
            close = difflib.get_close_matches(full, candidates, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(candidates)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(value, hints[key], f"{full}.")


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings as a nested config; values are parsed as YAML (numbers, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Merge defaults, an optional YAML file and ``key=value`` overrides into a checked RunConfig."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        layers.append(OmegaConf.load(path))
    layers.append(parse_overrides(overrides))
    raw = OmegaConf.merge(*layers) if layers else OmegaConf.create()
    raw_dict = OmegaConf.to_container(raw, resolve=True)
    _check_keys(raw_dict, RunConfig, "")
    preset = (raw_dict.get("model") or {}).get("preset")
    base = RunConfig()
    if preset is not None:
        base.model = model_preset(preset)
        if preset in PRESET_WEIGHT_DECAY:
            base.optim.weight_decay = PRESET_WEIGHT_DECAY[preset]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), raw)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad value for config key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    cfg: RunConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone do not catch."""
    enc = cfg.model.encoder
    if enc.d_model % enc.n_heads:
        raise ConfigError(f"model.encoder.d_model={enc.d_model} must be divisible by n_heads={enc.n_heads}")
    if enc.subsampling_factor not in (2, 4, 8, 16):
        raise ConfigError("model.encoder.subsampling_factor must be a power of 2 between 2 and 16")
    if enc.conv_norm_type not in ("batch_norm", "layer_norm"):
        raise ConfigError("model.encoder.conv_norm_type must be batch_norm or layer_norm")
    if enc.stochastic_depth_mode not in ("linear", "uniform"):
        raise ConfigError("model.encoder.stochastic_depth_mode must be linear or uniform")
    if cfg.model.quantizer.dist_fn not in ("l2", "cosine"):
        raise ConfigError("model.quantizer.dist_fn must be l2 or cosine")
    if enc.conv_kernel_size % 2 == 0:
        raise ConfigError("model.encoder.conv_kernel_size must be odd")
    if cfg.model.objective not in ("nest", "w2vbert"):
        raise ConfigError(f"model.objective={cfg.model.objective!r}: use nest or w2vbert")
    validate_w2vbert(cfg.model.w2vbert, cfg.model.preprocessor.features)
    if cfg.trainer.logger not in ("tensorboard", "wandb"):
        raise ConfigError(f"trainer.logger={cfg.trainer.logger!r}: use tensorboard or wandb")
    if cfg.trainer.precision not in (None, "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}: use 32, bf16-mixed or 16-mixed")


def validate_w2vbert(w: W2vBertConfig, features: int) -> None:
    """Value checks of the model.w2vbert section."""
    key = "model.w2vbert."
    positive = ("patch_size", "decoder_out", "codebook_size", "num_groups", "num_negatives")
    for name in positive:
        if getattr(w, name) < 1:
            raise ConfigError(f"{key}{name}={getattr(w, name)} must be at least 1")
    if w.mask_patches < 0:
        raise ConfigError(f"{key}mask_patches={w.mask_patches} must not be negative")
    if w.freq_masks < 0 or not 0 <= w.freq_width <= features:
        raise ConfigError(f"{key}freq_masks must be >= 0 and freq_width within [0, {features}]")
    if w.decoder_out % w.num_groups:
        raise ConfigError(f"{key}decoder_out={w.decoder_out} must be divisible by num_groups={w.num_groups}")
    if w.reduce not in ("sum", "mean"):
        raise ConfigError(f"{key}reduce={w.reduce!r}: use sum or mean")
    if w.logit_temp <= 0:
        raise ConfigError(f"{key}logit_temp must be positive")
    if not 0 < w.quantizer_temp_min <= w.quantizer_temp_start or not 0 < w.quantizer_temp_decay <= 1:
        raise ConfigError(f"{key}quantizer_temp_*: need 0 < min <= start and 0 < decay <= 1")
    if not 0 <= w.mask_threshold < 1:
        raise ConfigError(f"{key}mask_threshold must be in [0, 1)")
    if min(w.contrastive_alpha, w.mlm_alpha, w.prob_ppl_weight, w.multiplier) < 0 or w.mlm_start_step < 0:
        raise ConfigError(f"{key}: loss weights, multiplier and mlm_start_step must not be negative")
    if w.mlm and not w.quantized_targets:
        raise ConfigError(f"{key}mlm=true predicts the quantizer's ids: it needs quantized_targets=true")


def to_yaml(cfg: RunConfig) -> str:
    """The resolved configuration as YAML, as written into the experiment folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe() -> str:
    """Every section and key with its default, for ``train.py --help``."""
    return to_yaml(RunConfig())
