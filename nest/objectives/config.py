"""The configuration of a whole model: blocks (nest.model) and objective, as our checkpoints store it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nest.errors import ConfigError
from nest.model.conformer import ENCODER_PRESETS, EncoderConfig
from nest.model.features import PreprocessorConfig
from nest.model.masking import MaskingConfig
from nest.model.quantizer import QuantizerConfig


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
    quantizer_weight_std: float = 1.0  # init std of the quantizer's projection (NeMo's 1.0: logits of std ~25 on
    # 8 stacked normalized mel frames, a saturated softmax; 1 / sqrt(features * subsampling_factor): std ~1)
    quantizer_norm: str = "none"  # none (NeMo) | layer: LayerNorm (no affine) of each stacked step before projecting
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


def model_preset(name: str) -> ModelConfig:
    """The ModelConfig of one row of NeMo's size table."""
    if name not in ENCODER_PRESETS:
        raise ConfigError(f"model.preset={name!r} is not a preset; choose one of {sorted(ENCODER_PRESETS)}")
    return ModelConfig(preset=name, encoder=EncoderConfig(**ENCODER_PRESETS[name]))


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
    if w.quantizer_weight_std <= 0 or w.quantizer_norm not in ("none", "layer"):
        raise ConfigError(f"{key}quantizer_weight_std must be positive and quantizer_norm none or layer")
    if not 0 <= w.mask_threshold < 1:
        raise ConfigError(f"{key}mask_threshold must be in [0, 1)")
    if min(w.contrastive_alpha, w.mlm_alpha, w.prob_ppl_weight, w.multiplier) < 0 or w.mlm_start_step < 0:
        raise ConfigError(f"{key}: loss weights, multiplier and mlm_start_step must not be negative")
    if w.mlm and not w.quantized_targets:
        raise ConfigError(f"{key}mlm=true predicts the quantizer's ids: it needs quantized_targets=true")


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
