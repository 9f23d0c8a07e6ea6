"""Encoder and model options: chunked subsampling, post-convolution masking, .nemo option checks."""
import dataclasses

import pytest
import torch

from nest.config import load_config
from nest.errors import CheckpointError, ConfigError
from nest.io.nemo import model_config_from_nemo
from nest.model import ConformerEncoder, EncoderConfig, MaskingConfig, QuantizerConfig
from nest.model.conformer import ConvSubsampling
from nest.objectives import ModelConfig, NestModel
from tests.conftest import NEMO_FIXTURES, POST_CONV_FIXTURES


def tiny(**model) -> ModelConfig:
    return ModelConfig(
        quantizer=QuantizerConfig(num_classes=32, num_books=2, code_dim=8),
        encoder=EncoderConfig(n_layers=2, d_model=32, n_heads=4, subsampling_conv_channels=16),
        **model,
    )


@pytest.mark.parametrize("factor", [1, 4])
def test_chunked_subsampling_equals_plain(monkeypatch, factor):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny().encoder, subsampling_conv_chunking_factor=factor)
    encoder = ConformerEncoder(cfg, feat_in=80).eval()
    feats = torch.randn(5, 80, 160)
    lens = torch.tensor([160, 150, 97, 160, 33])
    plain_cfg = dataclasses.replace(cfg, subsampling_conv_chunking_factor=-1)
    plain = ConformerEncoder(plain_cfg, feat_in=80).eval()
    plain.load_state_dict(encoder.state_dict())
    # The first conv's output per utterance: 16 channels x 80 frames x 40 bins = 51,200 elements.
    monkeypatch.setattr(ConvSubsampling, "chunk_elements", 2 * 51_200)
    sizes = []
    original = ConvSubsampling._conv
    monkeypatch.setattr(ConvSubsampling, "_conv", lambda self, x, l: sizes.append(len(x)) or original(self, x, l))
    with torch.no_grad():
        out, out_lens = encoder(feats, lens)
        sizes_chunked, sizes[:] = list(sizes), []
        ref, ref_lens = plain(feats, lens)
    # factor 1: as few chunks as fit under the limit (3 of at most 2); 4: four chunks, whatever the batch size.
    assert sizes_chunked == ([2, 2, 1] if factor == 1 else [2, 1, 1, 1])
    assert sizes == [5]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out_lens, ref_lens)


def test_chunking_threshold_is_nemos():
    sub = ConvSubsampling(80, 512, 256, 8)
    per_utterance = 256 * 50_000 * 40  # 100,000 frames (1,000 s) of 80 bins
    assert sub.num_chunks(4, 100_000, 80) == 1  # 2.05e9 elements: under 2^31
    assert 2**31 // per_utterance == 4
    assert sub.num_chunks(5, 100_000, 80) == 2  # 4 + 1 utterances
    assert sub.num_chunks(9, 100_000, 80) == 3
    assert sub.num_chunks(1, 500_000, 80) == 1  # one utterance past the limit cannot be split
    assert ConvSubsampling(80, 512, 256, 8, chunking_factor=4).num_chunks(2, 100, 80) == 4  # two of them empty


def test_post_conv_masks_subsampled_frames_and_trains():
    torch.manual_seed(0)
    cfg = tiny(mask_position="post_conv", masking=MaskingConfig(block_size=40, mask_prob=0.1))
    model = NestModel(cfg).train()
    assert model.mask_processor.block_size == 5 and model.mask_processor.mask_embedding.shape == (32,)
    assert model.quantizer.proj.in_features == 32  # one subsampled frame (d_model) per token
    audio = 0.1 * torch.randn(2, 32000)
    lens = torch.tensor([32000, 24000])
    out = model(audio, lens, audio + 0.01 * torch.randn_like(audio), lens)
    T = out.log_probs.shape[1]
    assert out.frame_mask.shape == (2, T) and out.tokens.shape == (2, T, 2)
    assert torch.equal(out.token_mask, out.frame_mask)  # one frame per token
    assert torch.equal(out.mask_lens, out.encoded_lens)
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder.pre_encode.parameters())  # NeMo detaches it
    assert model.encoder.layers[0].self_attn.linear_q.weight.grad is not None


def test_post_conv_reproduces_nemos_forward():
    """NeMo's post_conv path written out with our modules: tokens from pre_encode(clean), masks on
    pre_encode(noisy), the encoder's layers on the masked frames, loss over masked frames."""
    torch.manual_seed(0)
    model = NestModel(tiny(mask_position="post_conv")).eval()
    audio = 0.1 * torch.randn(2, 32000)
    lens = torch.tensor([32000, 20000])
    noisy = audio + 0.02 * torch.randn_like(audio)
    with torch.no_grad():
        feats, feat_lens = model.preprocessor(audio, lens)
        nfeats, nlens = model.preprocessor(noisy, lens)
        clean_sub, _ = model.encoder.pre_encode(feats.transpose(1, 2), feat_lens)
        tokens = model.quantizer(clean_sub.transpose(1, 2))
        sub, sub_lens = model.encoder.pre_encode(nfeats.transpose(1, 2), nlens)
        mask = torch.zeros(2, sub.shape[1], dtype=torch.bool)
        mask[0, 3:9] = mask[1, 10:14] = True
        masked = torch.where(mask[:, :, None], model.mask_processor.mask_embedding, sub)
        x, pos = model.encoder.pos_enc(masked)
        valid = torch.arange(x.shape[1])[None] < sub_lens[:, None]
        for layer in model.encoder.layers:
            x = layer(x, pos, ~(valid[:, :, None] & valid[:, None, :]), ~valid)
        log_probs = model.decoder(x.transpose(1, 2))
        nll = -log_probs.gather(2, tokens[:, :, None, :]).squeeze(2)  # (B, T', N)
        expected = torch.stack([nll[..., n][mask].mean() for n in range(2)]).mean()
        out = model(audio, lens, noisy, lens, frame_mask=mask)
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.log_probs, log_probs)
    torch.testing.assert_close(out.loss, expected)


def nemo_config(**changes) -> dict:
    import yaml

    path = NEMO_FIXTURES / "nest_tiny_model_config.yaml"
    if not path.is_file():
        pytest.skip(f"no NeMo fixture config in {NEMO_FIXTURES}")
    cfg = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    return cfg


def test_nemo_post_conv_config_loads_as_nemo_saves_it():
    # NeMo rewrites these before saving a post_conv model: feat_in of quantizer and masking become
    # d_model, block_size is divided by the subsampling factor, the loss combines 1 frame.
    cfg = model_config_from_nemo(nemo_config(**{
        "mask_position": "post_conv", "quantizer.feat_in": 64, "masking.feat_in": 64, "masking.block_size": 5,
        "quantizer.combine_time_steps": 1, "loss.combine_time_steps": 1}))
    assert cfg.mask_position == "post_conv" and cfg.masking.block_size == 40
    model = NestModel(cfg)
    assert model.mask_processor.block_size == 5
    assert model.quantizer.proj.weight.shape == (2 * 8, 64)


@pytest.mark.parametrize("change, match", [
    ({"mask_position": "post_conv"}, "combine_time_steps=8 must be 1"),
    ({"encoder.conv_norm_type": "groupnorm4"}, "group norm"),
    ({"encoder.att_context_style": "chunked_limited"}, "chunked attention"),
    ({"encoder.conv_context_size": "causal"}, "conv_context_size"),
    ({"preprocessor.mag_power": 1.0}, "power spectrum"),
    ({"masking.allow_overlap": False}, "non-overlapping"),
    ({"encoder.reduction": "pooling"}, "time reduction"),
])
def test_nemo_options_not_implemented_are_refused(change, match):
    with pytest.raises(CheckpointError, match=match):
        model_config_from_nemo(nemo_config(**change))


def test_nemo_chunking_factor_and_guard_value_are_read():
    cfg = model_config_from_nemo(nemo_config(**{
        "encoder.subsampling_conv_chunking_factor": 4, "preprocessor.log_zero_guard_value": "tiny",
        "preprocessor.n_fft": None}))
    assert cfg.encoder.subsampling_conv_chunking_factor == 4
    assert cfg.preprocessor.log_zero_guard_value == torch.finfo(torch.float32).tiny
    assert cfg.preprocessor.n_fft == 512  # NeMo's default: next power of two of the 400-sample window


@pytest.mark.parametrize("override, match", [
    ("model.mask_position=middle", "mask_position"),
    ("model.encoder.subsampling_conv_chunking_factor=3", "chunking_factor"),
    ("model.encoder.untie_biases=false", "untie_biases=false: positional biases shared"),
    ("data.noise_bank_seconds=0.05", "noise_bank_seconds=0.05: must be 0 .no bank. or at least 1"),
])
def test_bad_option_values_fail_at_start_up(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


POST_CONV = POST_CONV_FIXTURES


@pytest.mark.skipif(not (POST_CONV / "nest_tiny_post_conv_io.pt").is_file(), reason=f"no fixture in {POST_CONV}")
def test_post_conv_matches_nemo():
    import yaml

    from nest.io.nemo import DERIVED_NEMO_KEYS, post_conv_keys

    from nest.io import load_weights

    io = torch.load(POST_CONV / "nest_tiny_post_conv_io.pt", weights_only=True)
    cfg = model_config_from_nemo(yaml.safe_load((POST_CONV / "nest_tiny_post_conv_model_config.yaml").read_text()))
    model = NestModel(cfg)
    state = {k: v for k, v in post_conv_keys(io["state_dict"]).items() if k not in DERIVED_NEMO_KEYS}
    load_weights(model, state, "post_conv fixture")
    mask = io["masks"][:, 0, :].bool()
    assert mask.any()
    with torch.no_grad():
        out = model.eval()(io["clean"], io["lens"], io["noisy"], io["lens"], frame_mask=mask)
    assert torch.equal(out.tokens, io["tokens"])
    assert torch.equal(out.encoded_lens, io["encoded_len"])
    torch.testing.assert_close(out.log_probs, io["log_probs"], rtol=0, atol=1e-4)
    assert abs(out.loss.item() - io["loss"].item()) <= 1e-5 * io["loss"].item()
