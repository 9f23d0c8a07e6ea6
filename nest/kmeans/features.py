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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchaudio
from lhotse.cut import Cut

from cuts.dataset import at_rate, load_mono
from cuts.io import sha256_file
from nest.errors import FeatureError
from nest.io.checkpoint import load_model
from nest.objectives.config import ModelConfig

MFCC_DIM = 39
KALDI_WINDOW = 0.025  # seconds, torchaudio.compliance.kaldi.mfcc's frame_length
KALDI_SHIFT = 0.010  # seconds, its frame_shift
# Mel frame j is centred on sample j * hop (centred STFT); Kaldi frame i (snip_edges) on
# i * hop + window / 2 = (i + 1.25) * hop. Kaldi frame j - 1 is the nearest (2.5 ms apart; frame j
# would be 12.5 ms late), so mel frame 0 and the last mel frames past Kaldi's frames have no label.
KALDI_LAG = round(KALDI_WINDOW / 2 / KALDI_SHIFT)  # 1


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


def num_tokens(num_samples: int, window_stride: float, sample_rate: int, subsampling_factor: int) -> int:
    """Tokens the encoder makes for ``num_samples`` at the model rate.

    Valid mel frames are ``num_samples // hop`` (MelFeatures.num_frames); each stride-2 convolution of
    ConvSubsampling maps a length L to (L - 1) // 2 + 1.
    """
    frames = num_samples // int(window_stride * sample_rate)
    for _ in range(int(subsampling_factor).bit_length() - 1):
        frames = (frames - 1) // 2 + 1
    return max(frames, 0)


class KaldiMfcc:
    """torchaudio.compliance.kaldi.mfcc(use_energy=False) with its defaults (25 ms povey windows every
    10 ms, snip_edges, DC removal, pre-emphasis 0.97, 23 mel bins from 20 Hz, 13 ceps, lifter 22), with
    the window, mel banks and DCT built once instead of per call and no unused energy column: the same
    numbers within float32 rounding, about twice as fast on short utterances."""

    NUM_MEL_BINS, NUM_CEPS, LIFTER, PREEMPH = 23, 13, 22.0, 0.97

    def __init__(self, sample_rate: int):
        self.window_size = int(sample_rate * KALDI_WINDOW)
        self.shift = int(sample_rate * KALDI_SHIFT)
        self.padded = 1 << (self.window_size - 1).bit_length()
        self.window = torch.hann_window(self.window_size, periodic=False).pow(0.85)  # povey
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(self.NUM_MEL_BINS, self.padded, float(sample_rate),
                                                             20.0, 0.0, 100.0, -500.0, 1.0)
        self.banks = torch.nn.functional.pad(banks, (0, 1)).T.contiguous()  # (padded // 2 + 1, mel)
        dct = torchaudio.functional.create_dct(self.NUM_MEL_BINS, self.NUM_MEL_BINS, "ortho")
        dct[:, 0] = (1.0 / self.NUM_MEL_BINS) ** 0.5  # Kaldi's C0 scale
        i = torch.arange(self.NUM_CEPS)
        lifter = 1.0 + 0.5 * self.LIFTER * torch.sin(torch.pi * i / self.LIFTER)
        self.dct = (dct[:, : self.NUM_CEPS] * lifter).contiguous()  # (mel, ceps), liftered
        self.eps = torch.finfo(torch.float32).eps

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """(S,) float32 -> (frames, 13); no frame when shorter than one window."""
        if audio.shape[0] < self.window_size:
            return torch.zeros(0, self.NUM_CEPS)
        frames = audio.unfold(0, self.window_size, self.shift)  # (m, window) view
        frames = frames - frames.mean(1, keepdim=True)
        buf = torch.zeros(frames.shape[0], self.padded)  # zero-padded FFT input
        torch.sub(frames[:, 1:], frames[:, :-1], alpha=self.PREEMPH, out=buf[:, 1: self.window_size])
        buf[:, 0] = frames[:, 0] * (1.0 - self.PREEMPH)  # Kaldi pre-emphasises the first sample by itself
        buf[:, : self.window_size] *= self.window
        power = torch.view_as_real(torch.fft.rfft(buf)).pow(2).sum(-1)  # (m, padded // 2 + 1)
        return (power @ self.banks).clamp_min(self.eps).log() @ self.dct


def deltas(x: torch.Tensor) -> torch.Tensor:
    """(frames, D) -> deltas over a 5-frame window with repeated edges (torchaudio's compute_deltas)."""
    p = torch.cat([x[:1], x[:1], x, x[-1:], x[-1:]])
    return (2.0 * (p[4:] - p[:-4]) + (p[3:-1] - p[1:-3])) / 10.0


_MFCC: dict[int, KaldiMfcc] = {}


def mfcc(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(S,) float audio in [-1, 1] -> (frames, 39): fairseq's HuBERT MFCC with deltas and delta-deltas."""
    if sample_rate not in _MFCC:
        _MFCC[sample_rate] = KaldiMfcc(sample_rate)
    m = _MFCC[sample_rate](audio.float().reshape(-1))  # (frames, 13)
    if len(m) == 0:
        return torch.zeros(0, MFCC_DIM)
    d = deltas(m)
    return torch.cat([m, d, deltas(d)], dim=1)  # (frames, 39)


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
    """A cut's audio at the model rate -> frame features (F, D) float32, and frame labels -> per-token
    labels. One per process (the encoder is loaded once)."""

    def __init__(self, recipe: FeatureRecipe, device: str = "cpu"):
        self.recipe = recipe
        self.device = torch.device(device)
        self.model = None
        if recipe.kind == "encoder":
            self.model = load_model(recipe.checkpoint).to(self.device).eval()

    def load_audio(self, cut: Cut) -> np.ndarray:
        """(S,) float32 mono audio at the model rate (several channels averaged)."""
        return load_mono(at_rate(cut, self.recipe.sample_rate))

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
