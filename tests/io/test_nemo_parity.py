"""The model reproduces tensors produced by NVIDIA NeMo 3.0.0 (see the fixtures' README)."""
import json

import pytest
import torch

from nest.io import nemo_model
from nest.objectives import count_parameters, model_preset, NestModel
from tests.conftest import NEMO_FIXTURES

FIXTURES = sorted(NEMO_FIXTURES.glob("*_io.pt")) if NEMO_FIXTURES.is_dir() else []


def close(a, b, atol):
    return (a - b).abs().max().item() <= atol


@pytest.mark.skipif(not FIXTURES, reason=f"no NeMo fixtures in {NEMO_FIXTURES}")
@pytest.mark.parametrize("io_path", FIXTURES, ids=lambda p: p.name)
def test_nemo_parity(io_path):
    name = io_path.name.removesuffix("_io.pt")
    io = torch.load(io_path, weights_only=True)
    model = nemo_model(NEMO_FIXTURES / f"{name}.nemo")
    with torch.no_grad():
        feats, feat_lens = model.preprocessor(io["clean"], io["lens"])
        noisy_feats, noisy_lens = model.preprocessor(io["noisy"], io["lens"])
        assert close(feats, io["feats"], 1e-4)
        assert torch.equal(feat_lens, io["feat_lens"])
        assert close(noisy_feats, io["noisy_feats"], 1e-4)
        assert torch.equal(noisy_lens, io["noisy_feat_lens"])
        assert torch.equal(model.quantizer(io["feats"]), io["tokens"])
        frame_mask = io["masks"][:, 0, :].bool()
        assert torch.equal(io["masks"], frame_mask[:, None, :].expand_as(io["masks"]).float())
        assert torch.equal(model.mask_processor.apply(io["noisy_feats"], frame_mask), io["masked_feats"])
        encoded, encoded_lens = model.encoder(io["masked_feats"], io["noisy_feat_lens"])
        assert close(encoded, io["encoded"], 1e-4)
        assert torch.equal(encoded_lens, io["encoded_lens"])
        out = model(io["clean"], io["lens"], io["noisy"], io["lens"], frame_mask=frame_mask)
        assert torch.equal(out.tokens, io["tokens"])
        assert close(out.log_probs, io["log_probs"], 1e-4)
        assert abs(out.loss.item() - io["loss"].item()) <= 1e-5 * abs(io["loss"].item())
        unmasked, _ = model.encoder(io["noisy_feats"], io["noisy_feat_lens"])
        assert close(unmasked, io["encoded_unmasked"], 1e-4)


@pytest.mark.skipif(not (NEMO_FIXTURES / "param_counts.json").is_file(), reason="no param_counts.json")
@pytest.mark.parametrize("preset", ["small", "medium", "large", "xlarge", "xxlarge"])
def test_preset_parameter_counts(preset):
    expected = json.loads((NEMO_FIXTURES / "param_counts.json").read_text())[preset]
    with torch.device("meta"):
        model = NestModel(model_preset(preset))
    counts = count_parameters(model)
    assert counts == {k: expected[k] for k in ("total", "trainable", "encoder")}
    # NeMo also stores the STFT window and mel filterbank, which we derive from the config.
    assert len(model.state_dict()) == expected["state_dict_keys"] - 2


def test_preset_totals_from_issue():
    totals = {"small": 14_191_616, "medium": 28_375_376, "large": 113_106_000,
              "xlarge": 615_844_944, "xxlarge": 1_069_081_680}
    for preset, total in totals.items():
        with torch.device("meta"):
            assert count_parameters(NestModel(model_preset(preset)))["total"] == total
