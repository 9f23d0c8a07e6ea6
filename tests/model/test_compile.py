"""model.compile: the compiled encoder gives the eager encoder's outputs and keeps the state dict keys."""
import shutil

import pytest
import torch

from nest.model import EncoderConfig, QuantizerConfig
from nest.objectives import ModelConfig, NestModel


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_encoder_equals_eager():
    torch.manual_seed(0)
    cfg = ModelConfig(
        quantizer=QuantizerConfig(num_classes=16, num_books=1, code_dim=8),
        encoder=EncoderConfig(n_layers=1, d_model=32, n_heads=2, subsampling_conv_channels=8, dropout=0.0,
                              dropout_pre_encoder=0.0, dropout_att=0.0),
    )
    model = NestModel(cfg).eval()
    keys = list(model.state_dict())
    feats, lens = torch.randn(2, 80, 64), torch.tensor([64, 40])
    with torch.no_grad():
        eager, eager_lens = model.encoder(feats, lens)
        model.compile_encoder()
        compiled, compiled_lens = model.encoder(feats, lens)
    assert list(model.state_dict()) == keys
    assert torch.equal(compiled_lens, eager_lens)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_one_graph_serves_every_bucket_shape():
    """model.compile marks batch and time dynamic: one graph for buckets of any batch size >= 2 and duration,
    where torch's default compiles a static graph first and then one per changing dimension. (aot_eager: the
    graphs and guards are Dynamo's and AOTAutograd's; Inductor only generates their code.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = ModelConfig(quantizer=QuantizerConfig(num_classes=16, num_books=1, code_dim=8),
                      encoder=EncoderConfig(n_layers=1, d_model=32, n_heads=2, subsampling_conv_channels=8))
    model = NestModel(cfg).train()
    model.compile_encoder(backend="aot_eager")
    for batch, seconds in [(8, 0.5), (6, 0.8), (12, 0.3), (3, 1.7), (2, 2.9)]:
        audio = 0.1 * torch.randn(batch, int(seconds * 16000))
        lens = torch.full((batch,), audio.shape[1])
        model(audio, lens, audio, lens).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
