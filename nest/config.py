"""Typed configuration: dataclasses per section, merged from YAML and ``key=value`` overrides.

Unknown keys and wrong types fail at start-up with the key named and the closest valid keys
suggested, never an hour into a run.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cuts.config import DataConfig

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]  # configs/ lives beside the packages


@dataclass
class PreprocessorConfig:
    """Log-mel features as NeMo's AudioToMelSpectrogramPreprocessor computes them."""

    sample_rate: int = 16000  # Hz; audio at other rates is resampled on load
    window_size: float = 0.025  # seconds of each STFT window
    window_stride: float = 0.01  # seconds between frames
    features: int = 80  # mel bands
    n_fft: int = 512  # FFT size
    preemph: float = 0.97  # pre-emphasis coefficient (0: off)
    log_zero_guard_value: float = 2**-24  # added before the log
    dither: float = 1e-5  # white noise added to the waveform while training
    pad_to: int = 16  # frames are padded to a multiple of this


@dataclass
class MaskingConfig:
    """Random block masking of the (noisy) features before subsampling."""

    block_size: int = 40  # mel frames (10 ms each); post_conv masks block_size // subsampling_factor frames
    mask_prob: float = 0.01  # probability that a block starts at a given frame
    max_mask_ratio: float = 0.8  # kept for older configs: NeMo 3.0.0's overlapping masking does not use it


@dataclass
class QuantizerConfig:
    """Frozen random-projection quantizer (BEST-RQ) producing the target tokens."""

    num_classes: int = 8192  # codewords per codebook (the decoder's classes)
    num_books: int = 1  # codebooks, one softmax each
    code_dim: int = 16  # dimension of the projection and the codewords
    dist_fn: str = "l2"  # l2 | cosine


@dataclass
class EncoderConfig:
    """FastConformer encoder."""

    n_layers: int = 17  # Conformer blocks
    d_model: int = 512  # model width
    n_heads: int = 8  # attention heads
    subsampling_factor: int = 8  # frames per encoder step (8: 80 ms)
    subsampling_conv_channels: int = 256  # channels of the subsampling convolutions
    subsampling_conv_chunking_factor: int = 1  # 1: split the batch only past 2^31 conv elements; 2^k: always; -1: never
    ff_expansion_factor: int = 4  # feed-forward width / d_model
    conv_kernel_size: int = 9  # depthwise convolution kernel (odd)
    conv_norm_type: str = "batch_norm"  # batch_norm | layer_norm
    xscaling: bool = True  # scale the input of the blocks by sqrt(d_model)
    untie_biases: bool = True  # per-layer positional biases (NeMo's default)
    use_bias: bool = True  # biases in linear and convolution layers
    dropout: float = 0.1  # dropout in the blocks
    dropout_pre_encoder: float = 0.1  # dropout after the positional encoding
    dropout_emb: float = 0.0  # dropout of the positional embeddings
    dropout_att: float = 0.1  # dropout of attention weights
    stochastic_depth_drop_prob: float = 0.0  # largest probability of skipping a block
    stochastic_depth_mode: str = "linear"  # linear | uniform
    stochastic_depth_start_layer: int = 1  # blocks before this one are never skipped


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
    targets: str = "random_projection"  # random_projection (NEST's quantizer) | kmeans (cut.targets from prepare.py kmeans)
    decoder_use_bias: bool = True  # bias in the token decoder
    mask_threshold: float = 0.8  # a token counts as masked when more of its frames are masked
    mask_position: str = "pre_conv"  # pre_conv: mask mel frames | post_conv: mask subsampled frames (NeMo's option)
    compile: bool = False  # torch.compile the encoder (NestModel.compile_encoder) in training
    objective: str = "nest"  # nest | w2vbert
    w2vbert: W2vBertConfig = field(default_factory=W2vBertConfig)  # used when objective=w2vbert


@dataclass
class OptimConfig:
    """AdamW with Noam annealing, NeMo's NEST defaults."""

    lr: float = 5.0  # scaled by d_model^-0.5 and the Noam schedule
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW's (beta1, beta2)
    weight_decay: float = 1e-3  # decoupled weight decay
    warmup_steps: int = 25000  # Noam warm-up, in optimizer steps
    min_lr: float = 1e-6  # the learning rate never decays below this


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets, and the training step's guards."""

    accelerator: str = "auto"  # auto | cpu | gpu | cuda | ... (Lightning's accelerators)
    devices: Any = "auto"  # number of devices per node, a list of ids, or auto
    num_nodes: int = 1  # machines (torchrun or SLURM start one process per device)
    strategy: str = "auto"  # auto | ddp | ... (Lightning's strategies; several devices: DDP)
    precision: Optional[str] = None  # 32-true | bf16-mixed; null: bf16-mixed on GPU, 32-true on CPU
    max_steps: int = 500000  # optimizer steps of the whole run
    val_check_interval: int = 2500  # optimizer steps between validations
    limit_val_batches: Optional[int] = None  # validation batches per validation (null: all)
    accumulate_grad_batches: int = 1  # batches per optimizer step
    gradient_clip_val: float = 0.0  # clip the gradient norm to this (0: off)
    log_every_n_steps: int = 10  # batches between logging steps (the only steps that wait on the device)
    checkpoint_every_n_steps: int = 2500  # optimizer steps between step checkpoints
    checkpoint_every_minutes: Optional[float] = None  # also refresh last.ckpt this often (null: off)
    keep_last: int = 5  # step checkpoints kept besides last.ckpt and best.ckpt (-1: all)
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    enable_progress_bar: bool = True  # tqdm progress bar with loss and audio seconds per second
    sync_batchnorm: bool = True  # SyncBatchNorm across GPUs under DDP (CUDA only)
    logger: str = "tensorboard"  # tensorboard | wandb (pip install '.[wandb]')
    wandb_project: Optional[str] = None  # W&B project (default: nest)


@dataclass
class RunConfig:
    """Everything train.py reads."""

    exp_dir: str = "exp/nest"  # checkpoints, TensorBoard logs, config.yaml and summary.json of the run
    seed: int = 42  # seeds data order, noise, masks and initialisation
    resume: Optional[str] = None  # auto (continue exp_dir's last checkpoint, or start) | PATH
    init_from: Optional[str] = None  # start from the weights of our checkpoint or a NeMo .nemo file
    init_model_config: bool = False  # take model.* from init_from's own config (key=value overrides still apply)
    init_include: List[str] = field(default_factory=list)  # fnmatch patterns of parameters to load (e.g. encoder.*)
    init_exclude: List[str] = field(default_factory=list)  # fnmatch patterns of parameters not to load
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


def _wrap_single_values(raw: Any, schema: type) -> None:
    """``data.train_cuts=a.jsonl.gz`` means ``[a.jsonl.gz]``: one value given for a list key becomes a list."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            _wrap_single_values(value, hint)
        elif typing.get_origin(hint) in (list, List) and value is not None and not isinstance(value, list):
            raw[key] = [value]


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings as a nested config; values are parsed as YAML (numbers, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    return OmegaConf.from_dotlist(list(overrides))


def find_config_file(path: str | Path) -> Path:
    """``path`` as given, else the same name in this repository (so `--config configs/x.yaml` works anywhere)."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (REPO / path, REPO / "configs" / path.name, REPO / "configs" / f"{path.name}.yaml"):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
    raise ConfigError(f"config file {str(path)!r} does not exist (the repository's configs: {available})")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Merge defaults, an optional YAML file and ``key=value`` overrides into a checked RunConfig."""
    layers = []
    if path is not None:
        layers.append(OmegaConf.load(find_config_file(path)))
    cli = parse_overrides(overrides)
    layers.append(cli)
    try:
        raw = OmegaConf.merge(*layers) if layers else OmegaConf.create()
        raw_dict = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read the configuration: {e}") from None
    _check_keys(raw_dict, RunConfig, "")
    _wrap_single_values(raw_dict, RunConfig)
    base = RunConfig()
    if raw_dict.get("init_model_config"):
        raw_dict["model"] = _model_from_checkpoint(base, raw_dict, OmegaConf.to_container(cli).get("model") or {})
    preset = (raw_dict.get("model") or {}).get("preset")
    if preset is not None:
        base.model = model_preset(preset)
        if preset in PRESET_WEIGHT_DECAY:
            base.optim.weight_decay = PRESET_WEIGHT_DECAY[preset]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.create(raw_dict))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad value for config key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    cfg: RunConfig = OmegaConf.to_object(merged)
    from nest.config_checks import validate  # value checks live beside; they need nothing above

    validate(cfg)
    return cfg


def _model_from_checkpoint(base: RunConfig, raw: dict, cli_model: dict) -> dict:
    """``init_model_config=true``: the model section of ``init_from``'s checkpoint, then the model.* keys given
    on the command line; model.* keys of the YAML file are dropped (with a note)."""
    source = raw.get("init_from")
    if not source:
        raise ConfigError("init_model_config=true needs init_from=PATH (our checkpoint or a NeMo .nemo file)")
    from nest.checkpoint import CheckpointError, read_model_config  # reading a checkpoint needs the models

    try:
        model = dataclasses.asdict(read_model_config(source))
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"init_from: {e}") from None
    dropped = sorted(set(raw.get("model") or {}) - set(cli_model))
    if dropped:
        log.info("init_model_config=true: model settings of the YAML file (%s) are replaced by %s's",
                 ", ".join(dropped), source)
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(model), OmegaConf.create(cli_model)))


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


def field_help(schema: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field of a config dataclass: the one line train.py --help shows."""
    out = {}
    for cls in reversed(schema.__mro__[:-1]):
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def describe(obj: Any = None, indent: str = "") -> str:
    """Every section and key with its default and meaning, for ``train.py --help``."""
    obj = RunConfig() if obj is None else obj
    helps = field_help(type(obj))
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:  # {(type(value).__doc__ or '').strip().splitlines()[0]}")
            lines.append(describe(value, indent + "  "))
        else:
            shown = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
            lines.append(f"{indent}{f.name}: {shown}  # {helps.get(f.name, '')}".rstrip())
    return "\n".join(lines)
