"""The Hugging Face adapter: a folder transformers' Parakeet loads and that computes our features + encoder."""
from dataclasses import replace

import pytest
import torch
import transformers

from nest.errors import CheckpointError
from nest.io.checkpoint import load_model
from nest.io.hf import parakeet_refusals, write_parakeet
from tests.support.export import nemo_fixture, read_speech, tiny



@pytest.fixture(params=["nest", "w2vbert"])
def exported(request, tmp_path):
    """(our model, its Parakeet folder) for a NeMo-made fixture of each objective."""
    model = load_model(nemo_fixture(request.param))
    write_parakeet(model.cfg, model.state_dict(), tmp_path)
    return model, tmp_path


def parakeet(folder):
    return (transformers.ParakeetEncoder.from_pretrained(folder).eval(),
            transformers.ParakeetFeatureExtractor.from_pretrained(folder))


def test_the_folder_holds_what_transformers_loads(exported):
    assert sorted(p.name for p in exported[1].iterdir()) == ["config.json", "model.safetensors",
                                                             "preprocessor_config.json"]


def test_parakeet_computes_our_encoder_on_real_speech(exported, real_data):
    model, folder = exported
    encoder, extractor = parakeet(folder)
    for audio in read_speech(real_data):
        with torch.no_grad():
            theirs = encoder(**extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt")).last_hidden_state[0]
            ours, lens = model.encode(audio[None], torch.tensor([len(audio)]))
        ours = ours[0, :, : lens[0]].T  # (T', D)
        assert theirs.shape == ours.shape
        assert (theirs - ours).abs().max() <= 1e-4 * ours.abs().max()  # measured: 5e-7


def test_parakeet_on_padded_batches_matches_at_valid_frames(exported, real_data):
    """Parakeet zeroes padded frames between the subsampling convolutions as NeMo 3.0.0 (and we) do."""
    model, folder = exported
    encoder, extractor = parakeet(folder)
    audio = read_speech(real_data)
    lens = torch.tensor([len(a) for a in audio])
    with torch.no_grad():
        out = encoder(**extractor([a.numpy() for a in audio], sampling_rate=16000, return_tensors="pt"))
        ours, ours_lens = model.encode(torch.nn.utils.rnn.pad_sequence(audio, batch_first=True), lens)
    assert out.attention_mask.sum(-1).tolist() == ours_lens.tolist()
    for b, n in enumerate(ours_lens.tolist()):
        valid = ours[b, :, :n].T
        assert (out.last_hidden_state[b, :n] - valid).abs().max() <= 1e-4 * valid.abs().max()  # measured: 4e-7


def test_parakeet_ctc_takes_the_encoder_with_strict_loading(exported):
    from safetensors.torch import load_file

    model, folder = exported
    config = transformers.ParakeetEncoderConfig.from_pretrained(folder)
    assert config.intermediate_size == model.cfg.encoder.d_model * model.cfg.encoder.ff_expansion_factor
    ctc = transformers.ParakeetForCTC(transformers.ParakeetCTCConfig(encoder_config=config.to_dict(), vocab_size=29,
                                                                     pad_token_id=28))
    weights = load_file(folder / "model.safetensors")
    ctc.encoder.load_state_dict(weights, strict=True)
    assert len(weights) == sum(k.startswith("encoder.") for k in model.state_dict())


@pytest.mark.parametrize("section, change, setting", [
    ("encoder", {"conv_norm_type": "layer_norm"}, "model.encoder.conv_norm_type=layer_norm"),
    ("encoder", {"untie_biases": False}, "model.encoder.untie_biases=False"),
    ("preprocessor", {"features": 100}, "model.preprocessor.features=100"),
    ("preprocessor", {"log_zero_guard_value": 1e-5}, "model.preprocessor.log_zero_guard_value=1e-05"),
    ("preprocessor", {"n_fft": 511}, "model.preprocessor.n_fft=511"),
])
def test_what_parakeet_cannot_express_is_refused_by_name(section, change, setting):
    cfg = tiny("nest")
    cfg = replace(cfg, **{section: replace(getattr(cfg, section), **change)})
    with pytest.raises(CheckpointError, match=setting.replace(".", r"\.")):
        parakeet_refusals(cfg)
