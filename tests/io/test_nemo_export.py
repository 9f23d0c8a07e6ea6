"""The NeMo adapter's export direction: our models as NeMo 3.0.0's config and state dict, checked offline against
the NeMo-made fixtures (../shared/fixtures/nemo*), and mapped back by the import direction."""
import io
import tarfile
from dataclasses import asdict, replace

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nest.config.schema import OptimConfig
from nest.errors import CheckpointError
from nest.io.checkpoint import load_model
from nest.io.nemo import model_config_from_nemo, to_nemo_config, to_nemo_state_dict, w2vbert_config_from_nemo
from nest.model.conformer import EncoderConfig
from nest.model.features import PreprocessorConfig
from nest.model.masking import MaskingConfig
from nest.model.quantizer import QuantizerConfig
from nest.objectives import build_model
from nest.objectives.config import ModelConfig, W2vBertConfig
from tests.support.export import nemo_fixture, tiny


def nemo_contents(path) -> tuple[dict, dict]:
    """(model_config.yaml, model_weights.ckpt) of a .nemo."""
    with tarfile.open(path, "r:") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return (yaml.safe_load(files["./model_config.yaml"]),
            torch.load(io.BytesIO(files["./model_weights.ckpt"]), weights_only=True))


@pytest.mark.parametrize("name", ["nest", "w2vbert", "post_conv"])
def test_nemo_made_models_map_back_unchanged(name):
    """Loaded and mapped back, NeMo's own files: the same sections and the same tensors in NeMo's order."""
    source = nemo_fixture(name)
    theirs_config, theirs_weights = nemo_contents(source)
    model = load_model(source)
    assert to_nemo_config(model.cfg, asdict(OptimConfig())) == theirs_config  # target and nemo_version too
    weights = to_nemo_state_dict(model.cfg, model.state_dict())
    assert list(weights) == list(theirs_weights)  # post_conv's aliases included
    for key, value in theirs_weights.items():  # the featurizer's window and fb (librosa's) too
        assert weights[key].dtype == value.dtype and torch.equal(weights[key], value), key


@pytest.mark.parametrize("objective", ["nest", "w2vbert"])
def test_our_models_have_nemos_layout(objective):
    """A model of ours at the fixture's sizes: NeMo's sections, keys, shapes and dtypes."""
    theirs_config, theirs_weights = nemo_contents(nemo_fixture(objective))
    torch.manual_seed(0)
    model = build_model(tiny(objective))
    assert to_nemo_config(model.cfg, asdict(OptimConfig())) == theirs_config
    weights = to_nemo_state_dict(model.cfg, model.state_dict())
    assert [(k, v.shape, v.dtype) for k, v in weights.items()] == \
        [(k, v.shape, v.dtype) for k, v in theirs_weights.items()]


def test_kmeans_targets_cannot_be_nemos():
    with pytest.raises(CheckpointError, match="model.targets=kmeans"):
        to_nemo_config(replace(tiny("nest"), targets="kmeans"), asdict(OptimConfig()))


def test_quantizer_norms_cannot_be_nemos():
    nest, w2v = tiny("nest"), tiny("w2vbert")
    with pytest.raises(CheckpointError, match="model.quantizer.norm=layer"):
        to_nemo_config(replace(nest, quantizer=replace(nest.quantizer, norm="layer")), asdict(OptimConfig()))
    with pytest.raises(CheckpointError, match="model.w2vbert.quantizer_norm=layer"):
        to_nemo_config(replace(w2v, w2vbert=replace(w2v.w2vbert, quantizer_norm="layer")), asdict(OptimConfig()))


model_configs = st.builds(
    lambda objective, d_heads, layers, factor, features, kernel, norm, bias, xscaling, post_conv, books, mlm: replace(
        ModelConfig(objective=objective, mask_position="post_conv" if post_conv and objective == "nest" else "pre_conv"),
        preprocessor=PreprocessorConfig(features=features, n_fft=512 if features <= 80 else 1024, preemph=0.9),
        encoder=EncoderConfig(d_model=d_heads[0] * d_heads[1], n_heads=d_heads[1], n_layers=layers,
                              subsampling_factor=factor, subsampling_conv_channels=16, conv_kernel_size=kernel,
                              conv_norm_type=norm, use_bias=bias, xscaling=xscaling, dropout=0.2,
                              stochastic_depth_drop_prob=0.1, stochastic_depth_mode="uniform",
                              subsampling_conv_chunking_factor=4),
        quantizer=QuantizerConfig(num_books=books, num_classes=32, dist_fn="cosine"),
        masking=MaskingConfig(mask_prob=0.05, max_mask_ratio=0.5),
        w2vbert=replace(W2vBertConfig(), mlm=mlm, codebook_size=8, mlm_alpha=10.0, logit_temp=0.2, reduce="mean"),
    ),
    st.sampled_from(["nest", "w2vbert"]), st.tuples(st.sampled_from([8, 16]), st.sampled_from([1, 2, 4])),
    st.integers(1, 4), st.sampled_from([4, 8]), st.sampled_from([64, 80, 128]), st.sampled_from([5, 9, 31]),
    st.sampled_from(["batch_norm", "layer_norm"]), st.booleans(), st.booleans(), st.booleans(), st.integers(1, 3),
    st.booleans(),
)


@settings(max_examples=40, deadline=None)
@given(model_configs)
def test_nemo_config_maps_back_onto_ours(cfg):
    """NeMo's config of any of our models reads back, through the import direction, as the same model."""
    nemo = to_nemo_config(cfg, asdict(OptimConfig()))
    # The other objective's sections are not in NeMo's model: they read back as defaults.
    if cfg.objective == "w2vbert":
        back, expected = w2vbert_config_from_nemo(nemo), replace(
            cfg, quantizer=QuantizerConfig(), masking=MaskingConfig(), decoder_use_bias=True, mask_threshold=0.8,
            w2vbert=cfg.w2vbert if cfg.w2vbert.mlm else replace(cfg.w2vbert, mlm_alpha=W2vBertConfig().mlm_alpha))
    else:
        back, expected = model_config_from_nemo(nemo), replace(cfg, w2vbert=W2vBertConfig())
    assert asdict(back) == asdict(expected)
