"""Check a .nemo written by ``nest-export --format nemo`` with NVIDIA NeMo 3.0.0 itself.

Run with NeMo's interpreter, never this project's: it imports nothing from this repository
(tests/commands/test_export_nemo.py runs it through $NEST_NEMO_PYTHON)::

    $NEST_NEMO_PYTHON tests/nemo_fixtures/check_export.py EXPORT.nemo INPUTS.pt OVERRIDES.json OUT.pt

1. ``ASRModel.restore_from(EXPORT)``: the class it builds, and its preprocessor + encoder (eval mode) on INPUTS'
   ``audio`` (B, S) / ``lens`` (B,): ``encoded`` (B, D, T'), ``encoded_lens``.
2. For a FastConformer CTC model and a hybrid RNNT/CTC model (character vocabularies, no tokenizer needed), whose
   preprocessor and encoder sections are those of NeMo's fast-conformer_ctc_bpe.yaml with the overrides
   ``nest-export`` prints (OVERRIDES.json, ``key=value`` without the leading ``++``) applied: NeMo's
   ``maybe_init_from_pretrained_checkpoint`` with ``init_from_nemo_model: {ssl: {path: EXPORT, include: [encoder]}}``,
   then every encoder tensor compared with the restored model's (``copied``/``total``/``not_copied``).
   ``ctc_one_more_layer`` does the same with n_layers one higher than the export's (what happens with
   fast-conformer_ctc_bpe.yaml's n_layers: 18 under a 17-layer encoder).
"""
import copy
import json
import sys

import torch
from omegaconf import OmegaConf

from nemo.collections.asr.models import ASRModel, EncDecCTCModel, EncDecHybridRNNTCTCModel

LABELS = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]
# The front end and encoder sections of NeMo's examples/asr/conf/fastconformer/fast-conformer_ctc_bpe.yaml.
RECIPE = {
    "sample_rate": 16000,
    "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", "sample_rate": 16000,
                     "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01, "window": "hann",
                     "features": 80, "n_fft": 512, "log": True, "frame_splicing": 1, "dither": 1e-5, "pad_to": 0,
                     "pad_value": 0.0},
    "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 80, "feat_out": -1,
                "n_layers": 18, "d_model": 512, "subsampling": "dw_striding", "subsampling_factor": 8,
                "subsampling_conv_channels": 256, "causal_downsampling": False, "ff_expansion_factor": 4,
                "self_attention_model": "rel_pos", "n_heads": 8, "att_context_size": [-1, -1],
                "att_context_style": "regular", "xscaling": True, "untie_biases": True, "pos_emb_max_len": 5000,
                "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "conv_context_size": None, "dropout": 0.1,
                "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1, "stochastic_depth_drop_prob": 0.0,
                "stochastic_depth_mode": "linear", "stochastic_depth_start_layer": 1},
}


def asr_config(overrides: list[str], hybrid: bool) -> OmegaConf:
    """The recipe's front end and encoder with ``overrides`` applied, and a CTC (or RNNT + CTC) head."""
    cfg = OmegaConf.merge(OmegaConf.create({"model": copy.deepcopy(RECIPE)}), OmegaConf.from_dotlist(overrides)).model
    ctc = {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": cfg.encoder.d_model,
           "num_classes": len(LABELS), "vocabulary": LABELS}
    cfg.labels = LABELS
    if not hybrid:
        cfg.decoder = ctc
        return cfg
    cfg.model_defaults = {"enc_hidden": cfg.encoder.d_model, "pred_hidden": 32, "joint_hidden": 32}
    cfg.decoder = {"_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
                   "random_state_sampling": False, "blank_as_pad": True,
                   "prednet": {"pred_hidden": 32, "pred_rnn_layers": 1, "t_max": None, "dropout": 0.0}}
    cfg.joint = {"_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None, "preserve_memory": False,
                 "fuse_loss_wer": False, "jointnet": {"joint_hidden": 32, "activation": "relu", "dropout": 0.0}}
    cfg.decoding = {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}}
    cfg.aux_ctc = {"ctc_loss_weight": 0.3, "use_cer": False, "ctc_reduction": "mean_batch", "decoder": ctc,
                   "decoding": {"strategy": "greedy"}}
    cfg.loss = {"loss_name": "default"}
    return cfg


def init_from(path: str, cls, cfg, reference: dict) -> dict:
    """Build ``cls`` from ``cfg``, initialise it as NeMo's scripts do, compare its encoder with ``reference``."""
    model = cls(cfg=cfg)
    model.maybe_init_from_pretrained_checkpoint(
        OmegaConf.create({"init_from_nemo_model": {"ssl": {"path": path, "include": ["encoder"]}}}))
    own = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    copied = [k for k, v in own.items() if k in reference and reference[k].shape == v.shape
              and torch.equal(reference[k], v)]
    return {"class": type(model).__name__, "total": len(own), "copied": len(copied),
            "not_copied": sorted(set(own) - set(copied))}


def plain(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t).copy_(t)


def main() -> None:
    path, inputs, overrides_file, out = sys.argv[1:5]
    overrides = json.loads(open(overrides_file).read())
    restored = ASRModel.restore_from(path, map_location="cpu").eval()
    data = torch.load(inputs, weights_only=True)
    with torch.no_grad():
        feats, feat_lens = restored.preprocessor(input_signal=data["audio"], length=data["lens"])
        encoded, encoded_lens = restored.encoder(audio_signal=feats, length=feat_lens)
    reference = {k: v for k, v in restored.state_dict().items() if k.startswith("encoder.")}
    n_layers = int(restored.cfg.encoder.n_layers)
    result = {
        # Plain copies: NeMo's typecheck hangs its neural types on the tensors it returns.
        "class": type(restored).__name__, "encoded": plain(encoded), "encoded_lens": plain(encoded_lens),
        "ctc": init_from(path, EncDecCTCModel, asr_config(overrides, hybrid=False), reference),
        "hybrid": init_from(path, EncDecHybridRNNTCTCModel, asr_config(overrides, hybrid=True), reference),
        "ctc_one_more_layer": init_from(path, EncDecCTCModel, asr_config(
            overrides + [f"model.encoder.n_layers={n_layers + 1}"], hybrid=False), reference),
    }
    torch.save(result, out)


if __name__ == "__main__":
    main()
