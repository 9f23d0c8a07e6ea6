"""Generate the NeMo fixture of tests/model/test_encoder_options.py::test_post_conv_matches_nemo.

Builds NVIDIA NeMo 3.0.0's ``EncDecDenoiseMaskedTokenPredModel`` with ``mask_position: post_conv`` at the sizes
of the pre_conv fixture ``nest_tiny`` (../shared/fixtures/nemo), runs it once in eval mode on real speech mixed
with real noise, and writes what the test compares against. Run it with NeMo's interpreter, never this
project's: it imports nothing from this repository, so that NeMo never becomes a dependency of the project::

    /work/nemo_venv/bin/python tests/nemo_fixtures/make_post_conv.py OUT_DIR [--real-data DIR] [--seed 7]
    NEST_POST_CONV_FIXTURES=OUT_DIR /work/main/.venv/bin/python -m pytest -q tests/model/test_encoder_options.py

OUT_DIR receives ``nest_tiny_post_conv_io.pt``, ``nest_tiny_post_conv_model_config.yaml`` (the config as NeMo
saves it into a .nemo), ``nest_tiny_post_conv.nemo`` and a README.md describing them.
"""
import argparse
import copy
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml
from omegaconf import OmegaConf

SPEECH = ["spk1_snt1.wav", "example2.flac", "2412-153948-0001.flac"]  # 2.9 s, 2.1 s, 10.5 s at 16 kHz
NOISE = ["noise1.wav", "noise3.wav", "noise4.wav"]
SNR_DB = (0.0, 10.0)  # each utterance's noise level, drawn uniformly in this range
SAMPLE_RATE = 16000

# The model section of NeMo's examples/asr/conf/ssl/nest/nest_fast-conformer.yaml (data sections removed) at the
# sizes of the pre_conv fixture nest_tiny, with post-convolution masking. mask_prob is raised from the YAML's
# 0.01 so that the few subsampled frames of these short utterances certainly hold masked blocks, and
# quantizer.combine_time_steps is 1: NeMo rewrites loss.combine_time_steps for post_conv but not the quantizer's,
# whose 8 would make one token of 8 subsampled frames (misaligned with the per-frame predictions).
CONFIG = {
    "sample_rate": SAMPLE_RATE,
    "num_classes": 64,
    "num_books": 2,
    "code_dim": 8,
    "squeeze_single": False,
    "mask_position": "post_conv",
    "preprocessor": {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": SAMPLE_RATE, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
        "window": "hann", "features": 80, "n_fft": 512, "log": True, "frame_splicing": 1, "dither": 1.0e-05,
        "pad_to": 16, "pad_value": 0.0,
    },
    "spec_augment": {
        "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
        "freq_masks": 0, "time_masks": 0, "freq_width": 27, "time_width": 0.05,
    },
    "masking": {
        "_target_": "nemo.collections.asr.modules.RandomBlockMasking",
        "block_size": 40, "mask_prob": 0.1, "feat_in": 80, "freeze": True, "allow_overlap": True,
    },
    "quantizer": {
        "_target_": "nemo.collections.asr.modules.RandomProjectionVectorQuantizer",
        "feat_in": 80, "code_dim": 8, "num_books": 2, "num_classes": 64, "dist_fn": "l2", "freeze": True,
        "squeeze_single": False, "combine_time_steps": 1,
    },
    "encoder": {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 80, "feat_out": -1, "n_layers": 2, "d_model": 64, "use_bias": True, "subsampling": "dw_striding",
        "subsampling_factor": 8, "subsampling_conv_channels": 32, "causal_downsampling": False,
        "ff_expansion_factor": 4, "self_attention_model": "rel_pos", "n_heads": 4, "att_context_size": [-1, -1],
        "att_context_style": "regular", "xscaling": True, "untie_biases": True, "pos_emb_max_len": 5000,
        "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "conv_context_size": None, "dropout": 0.1,
        "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1, "stochastic_depth_drop_prob": 0.0,
        "stochastic_depth_mode": "linear", "stochastic_depth_start_layer": 1,
    },
    "decoder": {
        "_target_": "nemo.collections.asr.modules.MultiSoftmaxDecoder",
        "feat_in": 64, "num_classes": 64, "num_decoders": 2, "squeeze_single": False, "use_bias": True,
    },
    "loss": {
        "_target_": "nemo.collections.asr.losses.MultiMLMLoss",
        "combine_time_steps": 8, "mask_threshold": 0.8, "num_decoders": 2, "squeeze_single": False,
    },
    "optim": {
        "name": "adamw", "lr": 5.0, "betas": [0.9, 0.98], "weight_decay": 1.0e-3,
        "sched": {"name": "NoamAnnealing", "d_model": 64, "warmup_steps": 25000, "warmup_ratio": None,
                  "min_lr": 1.0e-06},
    },
}


def read_mono(path: Path) -> np.ndarray:
    """A 16 kHz mono file as float32 samples; anything else is refused by name."""
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE:
        raise SystemExit(f"{path}: {sr} Hz, expected {SAMPLE_RATE}")
    return audio.mean(axis=1)


def noisy_batch(real: Path, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """clean, noisy (B, S), zero past lens (B,): each utterance plus a random stretch of one noise recording at a
    random SNR, the noise power taken over the utterance."""
    speech = [read_mono(real / "speech" / name) for name in SPEECH]
    lens = torch.tensor([len(s) for s in speech])
    clean = torch.zeros(len(speech), int(lens.max()))
    noisy = torch.zeros_like(clean)
    for i, (s, noise_name) in enumerate(zip(speech, NOISE)):
        noise = read_mono(real / "noise" / noise_name)
        if len(noise) < len(s):
            noise = np.tile(noise, -(-len(s) // len(noise)))
        start = int(rng.integers(0, len(noise) - len(s) + 1))
        n = noise[start : start + len(s)]
        snr = rng.uniform(*SNR_DB)
        gain = np.sqrt(np.mean(s**2) / (np.mean(n**2) * 10 ** (snr / 10)))
        clean[i, : len(s)] = torch.from_numpy(s)
        noisy[i, : len(s)] = torch.from_numpy(s + gain * n)
    return clean, noisy, lens


def run_forward(model, clean, noisy, lens, seed: int) -> tuple[tuple, bool]:
    """NeMo's forward with post_conv masking, the masks drawn after seeding; and whether the workaround was needed.

    NeMo 3.0.0's EncDecDenoiseMaskedTokenPredModel.forward (post_conv branch) feeds the clean features to the
    subsampling as the preprocessor returns them, (B, D, T), where ConvSubsampling expects (B, T, D) (the
    encoder transposes before calling it, and the tokens' transpose(1, 2) expects its (B, T', d_model) output):
    from audio it fails with a shape error. The workaround passes the clean features already transposed as
    processed_signal, which that branch uses for nothing else; everything else is NeMo's forward unchanged.
    """
    torch.manual_seed(seed)
    try:
        return model.forward(input_signal=clean, input_signal_length=lens, noisy_input_signal=noisy,
                             noisy_input_signal_length=lens, apply_mask=True), False
    except RuntimeError as e:
        if "shapes cannot be multiplied" not in str(e):
            raise
    feats, feat_lens = model.preprocessor(input_signal=clean, length=lens)  # (B, D, T)
    torch.manual_seed(seed)
    return model.forward(processed_signal=feats.transpose(1, 2), processed_signal_length=feat_lens,
                         noisy_input_signal=noisy, noisy_input_signal_length=lens, apply_mask=True), True


def saved_config(model, out: Path) -> dict:
    """Save the model as a .nemo and read back the model_config.yaml NeMo wrote into it."""
    nemo_path = out / "nest_tiny_post_conv.nemo"
    model.save_to(str(nemo_path))
    with tarfile.open(nemo_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("model_config.yaml"))
        return yaml.safe_load(tar.extractfile(member).read())


README = """# NeMo post_conv parity fixture for NEST

Written by `tests/nemo_fixtures/make_post_conv.py` (run under NeMo {nemo_version}, torch {torch_version}, CPU,
seed {seed}): NeMo's `EncDecDenoiseMaskedTokenPredModel` with `mask_position: post_conv` at the sizes of the
pre_conv fixture `nest_tiny` (encoder.n_layers=2, d_model=64, n_heads=4, subsampling_conv_channels=32,
num_classes=64, code_dim=8, num_books=2; masking.mask_prob=0.1 instead of the YAML's 0.01 so that these
short utterances hold masked blocks; quantizer.combine_time_steps=1, one token per subsampled frame, which NeMo
does not set itself for post_conv), in eval mode (no dither, no dropout), called with `apply_mask=True`.

- `nest_tiny_post_conv_model_config.yaml`: the model config as NeMo saved it into the .nemo. NeMo rewrites it
  for post_conv in the model's constructor: quantizer.feat_in and masking.feat_in become d_model,
  masking.block_size is divided by the subsampling factor (40 -> 5) and loss.combine_time_steps becomes 1.
- `nest_tiny_post_conv.nemo`: the same model saved with `model.save_to()`.
- `nest_tiny_post_conv_io.pt`: a dict of tensors.
  `state_dict` = `model.state_dict()` with NeMo's key names (post_conv holds the subsampling and mask embedding
  under alias names too: `encoder.pre_encode.pre_encode.*`, `encoder.pre_encode.masking.*`, `pre_encoder.*`).
  Inputs: `clean`, `noisy` (B={batch}, up to {max_samples} samples at 16 kHz, zero past `lens`), `lens`:
  real speech ({speech}) and real noise ({noise}) at {snr_lo}-{snr_hi} dB SNR, from `shared/data/real`.
  Outputs of `model.forward(input_signal=clean, noisy_input_signal=noisy, ..., apply_mask=True)`:
  `log_probs` (B, T', num_classes, num_books), `encoded_len` (B,), `masks` (B, d_model, T': the masks NeMo
  drew on the subsampled noisy frames, 1.0 where masked; random: compare given these), `tokens` (B, T',
  num_books); `loss` = `model.loss(masks, log_probs, tokens, encoded_len)`.
  Masked frames: {masked} of {frames}; loss {loss:.6f}.
{workaround}"""

WORKAROUND = """
NeMo {nemo_version}'s post_conv forward fails from audio: it feeds the clean features (B, D, T) to the
subsampling, which expects (B, T, D) (`RuntimeError: mat1 and mat2 shapes cannot be multiplied`). The forward
was therefore called with `processed_signal=preprocessor(clean).transpose(1, 2)`, which the post_conv branch
uses only for the tokens' subsampling; the noisy path, masking, encoder, decoder and loss are NeMo's unchanged.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the fixture into (created)")
    parser.add_argument("--real-data", type=Path, default=Path("/work/shared/data/real"),
                        help="shared/data/real: speech/ and noise/ recordings")
    parser.add_argument("--seed", type=int, default=7, help="seeds the weights, the noise mix and the masks")
    args = parser.parse_args()

    import nemo
    from nemo.collections.asr.models.ssl_models import EncDecDenoiseMaskedTokenPredModel

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = EncDecDenoiseMaskedTokenPredModel(cfg=OmegaConf.create(copy.deepcopy(CONFIG))).eval()
    clean, noisy, lens = noisy_batch(args.real_data, np.random.default_rng(args.seed))
    with torch.no_grad():
        (log_probs, encoded_len, masks, tokens), workaround = run_forward(model, clean, noisy, lens, args.seed)
        loss = model.loss(masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=encoded_len)
    frame_mask = masks[:, 0, :] > 0
    valid = torch.arange(masks.shape[-1])[None] < encoded_len[:, None]
    if not frame_mask.any() or not torch.isfinite(loss):
        raise SystemExit(f"no masked frame drawn with seed {args.seed} (loss {loss}): try another seed")
    # clone(): plain tensors, without the neural_type attribute NeMo's typecheck attaches to its outputs, so that
    # the file loads with weights_only=True
    io = {"state_dict": model.state_dict(), "clean": clean, "noisy": noisy, "lens": lens, "masks": masks,
          "tokens": tokens, "encoded_len": encoded_len, "log_probs": log_probs, "loss": loss}
    io = {k: {n: t.clone() for n, t in v.items()} if k == "state_dict" else v.clone() for k, v in io.items()}
    torch.save(io, args.out_dir / "nest_tiny_post_conv_io.pt")
    torch.load(args.out_dir / "nest_tiny_post_conv_io.pt", weights_only=True)  # as the test loads it
    config = saved_config(model, args.out_dir)
    (args.out_dir / "nest_tiny_post_conv_model_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (args.out_dir / "README.md").write_text(README.format(
        nemo_version=nemo.__version__, torch_version=torch.__version__, seed=args.seed, batch=len(lens),
        max_samples=int(lens.max()), speech=", ".join(SPEECH), noise=", ".join(NOISE), snr_lo=SNR_DB[0],
        snr_hi=SNR_DB[1], masked=int((frame_mask & valid).sum()), frames=int(valid.sum()), loss=loss.item(),
        workaround=WORKAROUND.format(nemo_version=nemo.__version__) if workaround else ""))
    how = "with the processed_signal workaround" if workaround else "NeMo's forward as is"
    print(f"wrote {args.out_dir} ({how}): loss {loss.item():.6f}, {int((frame_mask & valid).sum())} masked frames "
          f"of {int(valid.sum())}, log_probs {tuple(log_probs.shape)}")


if __name__ == "__main__":
    main()
