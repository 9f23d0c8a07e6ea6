"""The training forward + backward makes no host-device synchronisation; metrics are sync-free too."""
import pytest
import torch

from nest.model import EncoderConfig, MaskingConfig, QuantizerConfig
from nest.objectives import ModelConfig, NestModel
from nest.training.syncs import HostSyncCounter


def sync_test_config(**model) -> ModelConfig:
    return ModelConfig(
        masking=MaskingConfig(mask_prob=0.08),
        quantizer=QuantizerConfig(num_classes=32, num_books=2, code_dim=8),
        encoder=EncoderConfig(n_layers=3, d_model=32, n_heads=4, subsampling_conv_channels=16,
                              stochastic_depth_drop_prob=0.5),
        **model,
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = 0.1 * torch.randn(3, 40000, generator=g)
    lens = torch.tensor([40000, 31000, 16000])
    audio[1, 31000:] = 0
    audio[2, 16000:] = 0
    return audio, lens, audio + 0.05 * torch.randn(audio.shape, generator=g) * (audio != 0)


def test_counter_sees_the_usual_syncs():
    x = torch.randn(10)
    with HostSyncCounter() as syncs:
        x.sum().item()
        _ = x[x > 0]
        if (x > 5).any():
            pass
        torch.nonzero(x)
        x.masked_select(x > 0)
    assert syncs.calls["aten._local_scalar_dense.default"] == 2
    assert syncs.calls["aten.index.Tensor"] == 1
    assert syncs.calls["aten.nonzero.default"] == 1
    assert syncs.calls["aten.masked_select.default"] == 1
    with HostSyncCounter(device_type="cuda") as other:
        x.sum().item()
    assert other.count == 0  # only ops on the named device count


@pytest.mark.parametrize("mask_position", ["pre_conv", "post_conv"])
def test_training_forward_backward_makes_no_host_sync(mask_position):
    torch.manual_seed(0)
    model = NestModel(sync_test_config(mask_position=mask_position)).train()
    assert model.cfg.preprocessor.dither > 0 and model.cfg.encoder.stochastic_depth_drop_prob > 0
    audio, lens, noisy = batch()
    out = model(audio, lens, noisy, lens)  # warm-up outside the counter (lazy inits)
    out.loss.backward()
    for seed in range(4):  # stochastic depth drops and keeps layers across these draws
        torch.manual_seed(seed)
        with HostSyncCounter() as syncs:
            out = model(audio, lens, noisy, lens)
            out.loss.backward()
        assert syncs.count == 0, dict(syncs.calls)
        assert out.token_mask.any()  # (outside the counter) the step did mask something
        with HostSyncCounter() as syncs:
            metrics = model.metrics(out)
        assert syncs.count == 0, dict(syncs.calls)
        assert all(v.ndim == 0 for v in metrics.values())


def test_stochastic_depth_is_seeded_and_drops_layers():
    torch.manual_seed(0)
    model = NestModel(sync_test_config()).train()
    audio, lens, noisy = batch()
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(model(audio, lens, noisy, lens).loss)
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(losses[0], losses[2])


def test_metrics_equal_direct_computation():
    torch.manual_seed(0)
    model = NestModel(sync_test_config()).eval()
    audio, lens, noisy = batch()
    with torch.no_grad():
        out = model(audio, lens, noisy, lens, frame_mask=None, apply_mask=True)
        m = model.metrics(out)
    T = out.log_probs.shape[1]
    sel = out.token_mask[:, :T]
    pred = out.log_probs.argmax(2)
    assert sel.any()
    assert torch.isclose(m["masked_accuracy"], (pred == out.tokens[:, :T])[sel].float().mean())
    valid = torch.arange(T)[None] < out.encoded_lens[:, None]
    perplexities = []
    for n in range(out.tokens.shape[-1]):
        counts = torch.bincount(out.tokens[:, :T, n][valid], minlength=32).double()
        p = counts[counts > 0] / counts.sum()
        perplexities.append(torch.exp(-(p * p.log()).sum()))
    assert torch.isclose(m["target_perplexity"].double(), torch.stack(perplexities).mean(), rtol=1e-5)
    frames = torch.arange(out.frame_mask.shape[1])[None] < model.preprocessor.num_frames(lens)[:, None]
    assert torch.isclose(m["masked_fraction"], out.frame_mask[frames].float().mean())
