"""The model's blocks, torch only, each beside its config dataclass.

Import order (each module imports only those above it): features -> masking, quantizer -> conformer -> heads.
"""
from nest.model.features import MelFeatures, PreprocessorConfig, lengths_to_mask
from nest.model.masking import MaskingConfig, RandomBlockMasking
from nest.model.quantizer import QuantizerConfig, RandomProjectionQuantizer
from nest.model.conformer import ENCODER_PRESETS, ConformerEncoder, EncoderConfig
from nest.model.heads import ContrastiveDecoder, MultiSoftmaxDecoder, codebook_perplexity
