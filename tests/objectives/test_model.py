"""Model pieces on small configs: masking law, loss, schedule, precision, checkpoints."""

import pytest
import torch

from nest.errors import CheckpointError
from nest.io import load_model, safe_torch_load, save_model
from nest.model import EncoderConfig, MaskingConfig, QuantizerConfig, RandomBlockMasking
from nest.objectives import ModelConfig, NestModel
from nest.objectives.nest import masked_token_loss, token_mask_from_frames
from nest.training.optim import noam_lambda
from nest.model.features import lengths_to_mask
from nest.model.heads import code_counts
from nest.model.quantizer import RandomProjectionQuantizer


def tiny_config() -> ModelConfig:
    return ModelConfig(
        quantizer=QuantizerConfig(num_classes=32, num_books=2, code_dim=8),
        encoder=EncoderConfig(n_layers=2, d_model=32, n_heads=4, subsampling_conv_channels=16),
    )


def nemo_reference_mask(lens, T, block=40, p=0.01):
    """NeMo 3.0.0's RandomBlockMasking.forward_with_overlap, transcribed (max-pooled block starts)."""
    positions = torch.arange(T)
    valid_starts = positions + block <= lens.unsqueeze(1)
    start_mask = (torch.rand(len(lens), T) < p) & valid_starts
    padded = torch.nn.functional.pad(start_mask.unsqueeze(1).float(), (block - 1, 0))
    return torch.nn.functional.max_pool1d(padded, kernel_size=block, stride=1).bool()[:, 0]


def test_masks_equal_nemos_for_the_same_seed():
    lens = torch.tensor([20, 45, 120, 400, 1000, 1600])
    T = 1600
    for block, p in ((40, 0.01), (5, 0.05), (1, 0.3)):
        masking = RandomBlockMasking(MaskingConfig(block_size=block, mask_prob=p), feat_in=80)
        for seed in range(5):
            torch.manual_seed(seed)
            ours = masking.sample(lens, T)
            torch.manual_seed(seed)
            assert torch.equal(ours, nemo_reference_mask(lens, T, block, p)), (block, p, seed)
    valid = torch.arange(T)[None] < lens[:, None]
    assert not (ours & ~valid).any()  # never past the end


def test_masking_is_seeded():
    masking = RandomBlockMasking(MaskingConfig(), feat_in=80)
    lens = torch.tensor([300, 500])
    a = masking.sample(lens, 512, torch.Generator().manual_seed(3))
    b = masking.sample(lens, 512, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_token_mask_threshold():
    frames = torch.zeros(1, 24, dtype=torch.bool)
    frames[0, :7] = True  # 7 of 8 frames: 0.875 > 0.8
    frames[0, 8:14] = True  # 6 of 8: 0.75, not masked
    assert token_mask_from_frames(frames, 8, 0.8).tolist() == [[True, False, False]]


def test_loss_is_mean_nll_over_masked_tokens_and_books():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(2, 5, 7, 3), dim=2)
    tokens = torch.randint(0, 7, (2, 5, 3))
    mask = torch.rand(2, 5) > 0.5
    mask[0, 0] = True
    expected = torch.stack([
        torch.nn.functional.nll_loss(log_probs[..., h][mask], tokens[..., h][mask]) for h in range(3)
    ]).mean()
    assert torch.allclose(masked_token_loss(log_probs, tokens, mask), expected)
    assert masked_token_loss(log_probs, tokens, torch.zeros_like(mask)).item() == 0.0


def test_noam_schedule_matches_nemo_formula():
    f = noam_lambda(d_model=512, warmup_steps=25000, base_lr=5.0, min_lr=1e-6)
    peak = 5.0 * f(25000)
    assert peak == pytest.approx(5.0 * 512**-0.5 * 25000**-0.5)
    assert 5.0 * f(1) < peak and 5.0 * f(100000) < peak
    assert 5.0 * f(10**12) == pytest.approx(1e-6)


def test_forward_backward_and_bf16_autocast_keep_targets_float32():
    torch.manual_seed(0)
    model = NestModel(tiny_config())
    audio = torch.randn(2, 16000) * 0.1
    lens = torch.tensor([16000, 12000])
    out = model(audio, lens, audio + 0.01 * torch.randn_like(audio), lens)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.encoder.layers[0].self_attn.linear_q.weight.grad is not None
    assert model.quantizer.proj.weight.grad is None  # frozen
    model.eval()
    with torch.no_grad():
        ref = model(audio, lens, audio, lens, frame_mask=out.frame_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats, _ = model.preprocessor(audio, lens)
            bf = model(audio, lens, audio, lens, frame_mask=out.frame_mask)
    assert feats.dtype == torch.float32
    assert torch.equal(bf.tokens, ref.tokens)
    assert abs(bf.loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()


def test_silent_audio_gives_finite_loss():
    model = NestModel(tiny_config())
    audio = torch.zeros(2, 16000)
    lens = torch.tensor([16000, 16000])
    out = model(audio, lens, audio, lens)
    assert torch.isfinite(out.loss)


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = NestModel(tiny_config()).eval()
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    audio, lens = torch.randn(1, 8000), torch.tensor([8000])
    a, _ = model.encode(audio, lens)
    b, _ = loaded.encode(audio, lens)
    assert torch.equal(a, b)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_torch_load(path, str(path))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_model(path)


def test_unknown_and_missing_keys_are_named(tmp_path):
    model = NestModel(tiny_config())
    state = dict(model.state_dict())
    state["encoder.bogus.weight"] = torch.zeros(1)
    del state["decoder.decoder_layers.0.bias"]
    torch.save({"model_config": __import__("dataclasses").asdict(model.cfg), "state_dict": state}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="encoder.bogus.weight.*decoder.decoder_layers.0.bias"):
        load_model(tmp_path / "x.pt")


def test_codes_used_counts_the_targets_of_every_training_step_of_the_logging_window():
    torch.manual_seed(0)
    cfg = ModelConfig(quantizer=QuantizerConfig(num_classes=4096, num_books=2, code_dim=8),
                      encoder=EncoderConfig(n_layers=1, d_model=32, n_heads=4, subsampling_conv_channels=16))
    model = NestModel(cfg).train()
    audio = 0.1 * torch.randn(4, 2, 16000)  # other audio at each step
    lens = torch.tensor([16000, 12000])
    outs = [model(audio[k], lens, audio[k], lens) for k in range(3)]
    counts = sum(code_counts(o.tokens, 4096, lengths_to_mask(o.encoded_lens, o.tokens.shape[1])) for o in outs)
    window = model.metrics(outs[-1])["codes_used"]
    assert window == (counts > 0).float().mean()  # the three steps, not the last one alone
    assert "codes_used" not in model.metrics(outs[-1])  # read: the window starts anew, empty
    model(audio[3], lens, audio[3], lens)
    one = model.metrics(outs[-1])["codes_used"]
    assert 0 < one < window
    model.eval()
    assert "codes_used" not in model.metrics(model(audio[0], lens, audio[0], lens))  # validation: no window


def test_quantizer_layer_norm_standardises_each_stacked_input_and_is_off_by_default():
    torch.manual_seed(0)
    plain = RandomProjectionQuantizer(QuantizerConfig(num_classes=64, code_dim=8), 80, 8)
    assert QuantizerConfig().norm == "none"
    normed = RandomProjectionQuantizer(QuantizerConfig(num_classes=64, code_dim=8, norm="layer"), 80, 8)
    normed.load_state_dict(plain.state_dict())  # the same projection and codebook: no new parameters
    feats = torch.randn(2, 80, 64)
    feats[:, :, 32:] = 0  # padding: a zero vector stays zero, and gets NeMo's token
    shifted = feats[:, :, :32] * 3.0 + 1.0  # a louder, offset copy of the valid frames
    assert torch.equal(normed(torch.cat([shifted, feats[:, :, 32:]], 2)), normed(feats))
    assert not torch.equal(plain(torch.cat([shifted, feats[:, :, 32:]], 2)), plain(feats))
    assert torch.equal(normed(feats)[:, 4:], plain(feats)[:, 4:])
