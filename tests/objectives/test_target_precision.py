"""Target tokens do not depend on the training precision: the same under bf16 autocast as in float32, for both
mask positions (the features, the clean subsampling of post_conv and the quantizer run in exact_float32)."""
import pytest
import torch

from nest.model import EncoderConfig, QuantizerConfig
from nest.objectives import ModelConfig, NestModel
from tests.objectives.test_host_syncs import batch


@pytest.mark.parametrize("mask_position", ["pre_conv", "post_conv"])
def test_tokens_are_the_same_under_bf16_autocast(mask_position):
    torch.manual_seed(0)
    cfg = ModelConfig(quantizer=QuantizerConfig(num_classes=2048, num_books=2, code_dim=16),
                      encoder=EncoderConfig(n_layers=1, d_model=64, n_heads=4, subsampling_conv_channels=64),
                      mask_position=mask_position)
    model = NestModel(cfg).train()  # dither on: the same draws in both runs
    audio, lens, noisy = batch()
    torch.manual_seed(1)
    fp32 = model(audio, lens, noisy, lens)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(audio, lens, noisy, lens)
    assert torch.equal(fp32.tokens, bf16.tokens)
    assert not torch.equal(fp32.log_probs, bf16.log_probs)  # the encoder did run in bf16
