"""NeMo 3.0.0 itself restores our .nemo exports and fine-tuning initialises from them (runs only where a NeMo
interpreter is named: NEST_NEMO_PYTHON=/path/to/nemo_venv/bin/python; README, Export, says how to make one).

The NeMo side is tests/nemo_fixtures/check_export.py, run in that interpreter: it imports nothing of ours."""
import json
import os
import subprocess
from dataclasses import replace

import pytest
import torch

from nest.config import load_model_config
from nest.export import export, finetune_overrides
from nest.io.checkpoint import load_model, save_model
from nest.objectives import build_model
from tests.conftest import ROOT
from tests.support.export import read_speech

NEMO_PYTHON = os.environ.get("NEST_NEMO_PYTHON")
pytestmark = pytest.mark.skipif(not NEMO_PYTHON, reason="NEST_NEMO_PYTHON (a python with nemo_toolkit 3.0.0) not set")


def model_config(kind: str):
    base = load_model_config(ROOT / "configs" / f"{'w2vbert' if kind == 'w2vbert' else 'nest'}_tiny.yaml")
    if kind == "post_conv":
        return replace(base, mask_position="post_conv")
    if kind == "varied":  # settings away from the recipes' defaults, each of which NeMo must read as we do
        return replace(base, preprocessor=replace(base.preprocessor, features=64, preemph=0.0, n_fft=1024),
                       encoder=replace(base.encoder, subsampling_factor=4, use_bias=False, xscaling=False,
                                       conv_norm_type="layer_norm", conv_kernel_size=5, ff_expansion_factor=2,
                                       subsampling_conv_chunking_factor=-1),
                       quantizer=replace(base.quantizer, num_books=1, dist_fn="cosine"), decoder_use_bias=False)
    return base


@pytest.mark.parametrize("kind, nemo_class", [
    ("nest", "EncDecDenoiseMaskedTokenPredModel"), ("w2vbert", "SpeechEncDecSelfSupervisedModel"),
    ("varied", "EncDecDenoiseMaskedTokenPredModel"), ("post_conv", "EncDecDenoiseMaskedTokenPredModel"),
])
def test_nemo_restores_the_export_and_initialises_asr_models_from_it(kind, nemo_class, tmp_path, real_data):
    torch.manual_seed(3)
    model = build_model(model_config(kind)).eval()
    save_model(model, tmp_path / "model.pt")
    export(tmp_path / "model.pt", tmp_path / "out.nemo", "nemo")
    audio = read_speech(real_data)
    lens = torch.tensor([len(a) for a in audio])
    batch = torch.nn.utils.rnn.pad_sequence(audio, batch_first=True)
    torch.save({"audio": batch, "lens": lens}, tmp_path / "inputs.pt")
    overrides = [o.strip("'").removeprefix("++") for o in finetune_overrides(model.cfg)]
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    r = subprocess.run([NEMO_PYTHON, str(ROOT / "tests" / "nemo_fixtures" / "check_export.py"), str(tmp_path / "out.nemo"),
                        str(tmp_path / "inputs.pt"), str(tmp_path / "overrides.json"), str(tmp_path / "nemo.pt")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    nemo = torch.load(tmp_path / "nemo.pt", weights_only=True)
    assert nemo["class"] == nemo_class

    ours, ours_lens = model.encode(batch, lens)
    assert nemo["encoded_lens"].tolist() == ours_lens.tolist()
    for b, n in enumerate(ours_lens.tolist()):
        assert (nemo["encoded"][b, :, :n] - ours[b, :, :n]).abs().max() <= 1e-4, b  # real speech, padded batch

    encoder_tensors = sum(k.startswith("encoder.") for k in model.state_dict())
    for head in ("ctc", "hybrid"):
        result = nemo[head]
        assert result["total"] == encoder_tensors
        if kind == "post_conv":
            # NeMo's own post_conv layout keeps the subsampling under encoder.pre_encode.pre_encode.*: an ASR model's
            # encoder.pre_encode.* is not loaded from it (nest-export says so).
            assert all(k.startswith("encoder.pre_encode.") for k in result["not_copied"]) and result["not_copied"]
        else:
            assert result["copied"] == encoder_tensors and not result["not_copied"], result
    # One layer more than the export (fast-conformer_ctc_bpe.yaml's 18 over NEST-L's 17): NeMo loads the rest and
    # leaves that layer random without an error.
    extra = nemo["ctc_one_more_layer"]
    n = model.cfg.encoder.n_layers
    assert extra["not_copied"] and all(k.startswith(f"encoder.layers.{n}.") for k in extra["not_copied"]) \
        or kind == "post_conv"
    # -1 (never split) is written as NeMo's 1, which NeMo 3.0.0 can run; no number changes.
    assert load_model(tmp_path / "out.nemo").cfg.encoder == replace(model.cfg.encoder, subsampling_conv_chunking_factor=1)
