"""The pretraining objectives, plain nn.Modules over the blocks of nest.model.

Import order: config -> base (preprocessor + encoder, shared) -> nest, w2vbert_loss -> w2vbert -> this table.
"""
from nest.objectives.config import ModelConfig, W2vBertConfig, model_config_from_dict, model_preset
from nest.objectives.base import EncoderModel, count_parameters, select_layers
from nest.objectives.nest import NestModel, NestOutput
from nest.objectives.w2vbert import W2vBertModel, W2vBertOutput

# model.objective -> the class that builds it.
OBJECTIVES: dict[str, type[EncoderModel]] = {"nest": NestModel, "w2vbert": W2vBertModel}


def build_model(cfg: ModelConfig) -> EncoderModel:
    """The model of ``cfg.objective``."""
    return OBJECTIVES[cfg.objective](cfg)
