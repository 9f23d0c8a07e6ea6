"""Frame features that k-means labels are made from, and how frame labels meet the model's tokens.

Two kinds, as in HuBERT's two iterations:

- ``mfcc``: fairseq's ``dump_mfcc_feature.py``: Kaldi-compatible MFCC (13 coefficients, 25 ms windows
  every 10 ms, ``snip_edges``, no energy) with deltas and delta-deltas, 39 dims, on audio at the model rate.
- ``encoder``: one layer of a NEST encoder (our checkpoint or a ``.nemo`` file), one vector per token (80 ms).

The model predicts one token per ``subsampling_factor`` mel frames (8 x 10 ms). Labels are stored per
cut as an int array (T', R): T' = the tokens the encoder makes for the cut, R = labels per token. MFCC
labels keep their 10 ms rate: R = 8, one softmax per 10 ms frame through the decoder's multi-book axis.
Encoder labels are at 80 ms already: R = 1. A position without a label is -1 (left out of the loss).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchaudio
from lhotse.cut import Cut

from cuts.dataset import at_rate, load_mono
from nest.config import ModelConfig

MFCC_DIM = 39
KALDI_WINDOW = 0.025  # seconds, torchaudio.compliance.kaldi.mfcc's frame_length
KALDI_SHIFT = 0.010  # seconds, its frame_shift
# Mel frame j is centred on sample j * hop (centred STFT); Kaldi frame i (snip_edges) on
# i * hop + window / 2 = (i + 1.25) * hop. Kaldi frame j - 1 is the nearest (2.5 ms apart; frame j
# would be 12.5 ms late), so mel frame 0 and the last mel frames past Kaldi's frames have no label.
KALDI_LAG = round(KALDI_WINDOW / 2 / KALDI_SHIFT)  # 1


class FeatureError(ValueError):
    """A feature source that cannot be used; the message names the flag or file and what to do."""


@dataclass
class FeatureRecipe:
    """Everything that decides the features and the label layout; stored in kmeans.pt."""

    kind: str  # mfcc | encoder
    sample_rate: int  # audio is resampled to this (the model's) rate first
    window_stride: float  # seconds per mel frame of the model
    subsampling_factor: int  # mel frames per token
    labels_per_token: int  # R: subsampling_factor for mfcc (10 ms labels), 1 for encoder features
    feature_dim: int
    layer: Optional[int] = None  # encoder layer, counted from 0 (first Conformer block's output)
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None

    @property
    def token_shift(self) -> float:
        """Seconds per token (the TemporalArray's frame_shift)."""
        return self.subsampling_factor * self.window_stride

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def num_tokens(num_samples: int, window_stride: float, sample_rate: int, subsampling_factor: int) -> int:
    """Tokens the encoder makes for ``num_samples`` at the model rate.

    Valid mel frames are ``num_samples // hop`` (MelFeatures.num_frames); each stride-2 convolution of
    ConvSubsampling maps a length L to (L - 1) // 2 + 1.
    """
    frames = num_samples // int(window_stride * sample_rate)
    for _ in range(int(subsampling_factor).bit_length() - 1):
        frames = (frames - 1) // 2 + 1
    return max(frames, 0)


def mfcc(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(S,) float audio in [-1, 1] -> (frames, 39): fairseq's HuBERT MFCC with deltas and delta-deltas."""
    x = audio.float().reshape(1, -1)
    if x.shape[1] < round(KALDI_WINDOW * sample_rate):
        return torch.zeros(0, MFCC_DIM)  # shorter than one Kaldi window: no frame
    m = torchaudio.compliance.kaldi.mfcc(x, sample_frequency=sample_rate, use_energy=False).T  # (13, frames)
    d = torchaudio.functional.compute_deltas(m)
    dd = torchaudio.functional.compute_deltas(d)
    return torch.cat([m, d, dd], dim=0).T.contiguous()  # (frames, 39)


def mfcc_labels_to_tokens(frame_labels: np.ndarray, num_samples: int, recipe: FeatureRecipe) -> np.ndarray:
    """Labels of Kaldi frames (F,) -> (T', R) per token: position r of token t is mel frame t * R + r."""
    T = num_tokens(num_samples, recipe.window_stride, recipe.sample_rate, recipe.subsampling_factor)
    R = recipe.labels_per_token
    n_mel = num_samples // int(recipe.window_stride * recipe.sample_rate)
    out = np.full(T * R, -1, dtype=np.int64)
    kaldi = np.arange(n_mel) - KALDI_LAG  # the Kaldi frame nearest each mel frame
    ok = (kaldi >= 0) & (kaldi < len(frame_labels))
    out[:n_mel][ok] = frame_labels[kaldi[ok]]
    return out.reshape(T, R)


def encoder_labels_to_tokens(frame_labels: np.ndarray, num_samples: int, recipe: FeatureRecipe) -> np.ndarray:
    """Encoder frames are the tokens: (T',) -> (T', 1)."""
    return frame_labels.astype(np.int64).reshape(-1, 1)


class Featurizer:
    """Cut -> (frame features (F, D) float32, num_samples at the model rate); one per process."""

    def __init__(self, recipe: FeatureRecipe, device: str = "cpu"):
        self.recipe = recipe
        self.device = torch.device(device)
        self.model = None
        if recipe.kind == "encoder":
            from nest.checkpoint import load_model

            self.model = load_model(recipe.checkpoint).to(self.device).eval()

    def load_audio(self, cut: Cut) -> np.ndarray:
        """(S,) float32 mono audio at the model rate; raises ValueError on non-finite samples."""
        audio = load_mono(at_rate(cut, self.recipe.sample_rate))
        if not np.isfinite(audio).all():
            raise ValueError("non-finite samples")
        return audio

    @torch.no_grad()
    def __call__(self, audio: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(audio)
        if self.recipe.kind == "mfcc":
            return mfcc(x, self.recipe.sample_rate).numpy()
        x = x.to(self.device)[None]
        lens = torch.tensor([x.shape[1]], device=self.device)
        _, enc_lens, hidden = self.model.encode(x, lens, return_layers=True)
        return hidden[self.recipe.layer][0, :, : int(enc_lens[0])].T.float().cpu().numpy()  # (T', D)

    def to_tokens(self, frame_labels: np.ndarray, num_samples: int) -> np.ndarray:
        """Frame labels -> (T', R) int64 per token, -1 where a position has no label."""
        layout = mfcc_labels_to_tokens if self.recipe.kind == "mfcc" else encoder_labels_to_tokens
        return layout(frame_labels, num_samples, self.recipe)


def mfcc_recipe(model_cfg: Optional[ModelConfig] = None) -> FeatureRecipe:
    """MFCC labels at 10 ms laid out on the tokens of a model with ``model_cfg`` (default: the project's)."""
    cfg = model_cfg or ModelConfig()
    pre, factor = cfg.preprocessor, cfg.encoder.subsampling_factor
    if abs(pre.window_stride - KALDI_SHIFT) > 1e-9:
        raise FeatureError(
            f"MFCC labels are at {KALDI_SHIFT * 1000:.0f} ms but the model's mel hop "
            f"(model.preprocessor.window_stride) is {pre.window_stride * 1000:g} ms: use a 10 ms model "
            "or --features encoder"
        )
    return FeatureRecipe(kind="mfcc", sample_rate=pre.sample_rate, window_stride=pre.window_stride,
                         subsampling_factor=factor, labels_per_token=factor, feature_dim=MFCC_DIM)


def encoder_recipe(checkpoint: Optional[str], layer: Optional[int]) -> FeatureRecipe:
    """Layer ``layer`` (from 0; negative from the end) of the encoder of ``checkpoint`` (ours or .nemo)."""
    from nest.checkpoint import load_model

    if not checkpoint:
        raise FeatureError("--features encoder needs --checkpoint CKPT (one of our checkpoints or a .nemo file)")
    path = Path(checkpoint)
    if not path.is_file():
        raise FeatureError(f"--checkpoint {path}: no such file; give one of our checkpoints "
                           "(exp/.../checkpoints/*.ckpt) or a NeMo .nemo file")
    if layer is None:
        raise FeatureError("--features encoder needs --layer L (counted from 0, the first Conformer block)")
    cfg = load_model(path).cfg
    n = cfg.encoder.n_layers
    if not -n <= layer < n:
        raise FeatureError(f"--layer {layer} is out of range for the {n}-layer encoder of {path}: "
                           f"use 0..{n - 1} (or -{n}..-1 from the end)")
    pre = cfg.preprocessor
    return FeatureRecipe(kind="encoder", sample_rate=pre.sample_rate, window_stride=pre.window_stride,
                         subsampling_factor=cfg.encoder.subsampling_factor, labels_per_token=1,
                         feature_dim=cfg.encoder.d_model, layer=layer % n, checkpoint=str(path.resolve()),
                         checkpoint_sha256=sha256_file(path))
