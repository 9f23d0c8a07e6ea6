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

    block_size: int = 40  # mel frames (10 ms each); post_conv masks block_size // subsampling_factor frames
    mask_prob: float = 0.01  # probability that a block starts at a given frame
    max_mask_ratio: float = 0.8  # kept for older configs: NeMo 3.0.0's overlapping masking does not use it


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
    subsampling_conv_chunking_factor: int = 1  # 1: split the batch only past 2^31 conv elements; 2^k: always; -1: never
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
class ModelConfig:
    """The whole NEST model. ``preset`` picks a row of NeMo's size table; other keys override it."""

    preset: Optional[str] = None  # small | medium | large | xlarge | xxlarge
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_use_bias: bool = True
    mask_threshold: float = 0.8  # a token counts as masked when more of its frames are masked
    mask_position: str = "pre_conv"  # pre_conv: mask mel frames | post_conv: mask subsampled frames (NeMo's option)
    compile: bool = False  # torch.compile the encoder (NestModel.compile_encoder) in training


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
    if cfg.model.mask_position not in ("pre_conv", "post_conv"):
        raise ConfigError(f"model.mask_position={cfg.model.mask_position!r}: use pre_conv or post_conv")
    if cfg.model.mask_position == "post_conv" and cfg.model.masking.block_size < enc.subsampling_factor:
        raise ConfigError(f"model.masking.block_size={cfg.model.masking.block_size} is under one subsampled frame "
                          f"(subsampling_factor={enc.subsampling_factor}) with mask_position=post_conv")
    c = enc.subsampling_conv_chunking_factor
    if c not in (-1, 1) and (c < 1 or c & (c - 1)):
        raise ConfigError(f"model.encoder.subsampling_conv_chunking_factor={c}: use -1, 1 or a power of 2")
    if cfg.model.quantizer.dist_fn not in ("l2", "cosine"):
        raise ConfigError("model.quantizer.dist_fn must be l2 or cosine")
    if enc.conv_kernel_size % 2 == 0:
        raise ConfigError("model.encoder.conv_kernel_size must be odd")
    if cfg.trainer.logger not in ("tensorboard", "wandb"):
        raise ConfigError(f"trainer.logger={cfg.trainer.logger!r}: use tensorboard or wandb")
    if cfg.trainer.precision not in (None, "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}: use 32, bf16-mixed or 16-mixed")


def to_yaml(cfg: RunConfig) -> str:
    """The resolved configuration as YAML, as written into the experiment folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe() -> str:
    """Every section and key with its default, for ``train.py --help``."""
    return to_yaml(RunConfig())
