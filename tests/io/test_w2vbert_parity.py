"""The Wav2vec-BERT model reproduces NVIDIA NeMo 3.0.0's SpeechEncDecSelfSupervisedModel (fixture README)."""
import json

import pytest
import torch

from nest.io import nemo_model
from nest.model import lengths_to_mask
from nest.objectives import count_parameters
from nest.objectives.w2vbert import W2vBertModel, sample_patch_mask
from tests.conftest import W2VBERT_FIXTURES

FIXTURES = sorted(
    p for p in (W2VBERT_FIXTURES.glob("*_io.pt") if W2VBERT_FIXTURES.is_dir() else [])
    if (W2VBERT_FIXTURES / f"{p.name.removesuffix('_io.pt')}.nemo").is_file()
)
needs_fixtures = pytest.mark.skipif(not FIXTURES, reason=f"no NeMo w2v-BERT fixtures in {W2VBERT_FIXTURES}")


def max_err(a, b):
    return (a - b).abs().max().item()


def rel_err(a, b):
    return abs(a.item() - b.item()) / abs(b.item())


def recorded_masks(spec_masks: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo's spec_masks (B, F, T) -> time mask (B, T), frequency mask (B, F): whole columns and rows."""
    spec = spec_masks.bool()
    valid = lengths_to_mask(lens, spec.shape[-1])[:, None, :]
    return spec.all(1), (spec | ~valid).all(-1)


@needs_fixtures
@pytest.mark.parametrize("io_path", FIXTURES, ids=lambda p: p.name)
def test_w2vbert_parity(io_path):
    name = io_path.name.removesuffix("_io.pt")
    io = torch.load(io_path, weights_only=True)
    model = nemo_model(W2VBERT_FIXTURES / f"{name}.nemo")
    assert isinstance(model, W2vBertModel)
    with torch.no_grad():
        feats, lens = model.preprocessor(io["audio"], io["lens"])
        assert max_err(feats, io["feats"]) <= 1e-4
        # NeMo's masks, recovered from its record, rebuild its masked features and mask exactly.
        frame_mask, freq_mask = recorded_masks(io["spec_masks"], lens)
        masked = frame_mask[:, None, :] | freq_mask[:, :, None]
        assert torch.equal(io["feats"].masked_fill(masked, 0.0), io["masked_feats"])
        assert torch.equal((masked & lengths_to_mask(lens, masked.shape[-1])[:, None, :]).float(), io["spec_masks"])
        # Its patch count follows the law sampled here (from the shortest utterance).
        w = model.cfg.w2vbert
        assert torch.equal(sample_patch_mask(lens, feats.shape[-1], w.patch_size, w.mask_patches).sum(1),
                           frame_mask.sum(1))
        encoded, encoded_lens = model.encoder(io["masked_feats"], lens)
        assert max_err(encoded, io["encoded"]) <= 1e-4
        assert torch.equal(encoded_lens, io["encoded_lens"])
        out = model(io["audio"], io["lens"], io["audio"], io["lens"], frame_mask=frame_mask, freq_mask=freq_mask,
                    negatives=io["neg_idxs"])
        assert torch.equal(out.encoded_lens, io["encoded_lens"])
        assert max_err(out.decoder_out, io["contrastive_decoder_out"]) <= 1e-4
        assert max_err(out.mlm_log_probs, io["mlm_log_probs"]) <= 1e-4
        assert torch.equal(out.target_ids, io["target_ids"])
        assert rel_err(out.contrastive_loss, io["loss_contrastive"]) <= 1e-5
        assert rel_err(out.mlm_loss, io["loss_mlm"]) <= 1e-5
        assert rel_err(out.loss, io["loss_total"]) <= 1e-5


@needs_fixtures
@pytest.mark.parametrize("io_path", FIXTURES, ids=lambda p: p.name)
def test_w2vbert_parameter_counts(io_path):
    name = io_path.name.removesuffix("_io.pt")
    meta = json.loads((W2VBERT_FIXTURES / f"{name}_meta.json").read_text())
    counts = count_parameters(nemo_model(W2VBERT_FIXTURES / f"{name}.nemo"))
    assert {k: counts[k] for k in ("total", "trainable")} == meta["param_counts"]
