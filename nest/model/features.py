"""Log-mel features, numerically as NeMo's AudioToMelSpectrogramPreprocessor (FilterbankFeatures)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio
from torch import nn

from nest.model.precision import exact_float32


@dataclass
class PreprocessorConfig:
    """Log-mel features as NeMo's AudioToMelSpectrogramPreprocessor computes them."""

    sample_rate: int = 16000  # Hz; audio at other rates is resampled on load
    window_size: float = 0.025  # seconds of each STFT window
    window_stride: float = 0.01  # seconds between frames
    features: int = 80  # mel bands
    n_fft: int = 512  # FFT size
    preemph: float = 0.97  # pre-emphasis coefficient (0: off)
    log_zero_guard_value: float = 2**-24  # added before the log
    dither: float = 1e-5  # white noise added to the waveform while training
    pad_to: int = 16  # frames are padded to a multiple of this


def lengths_to_mask(lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


class MelFeatures(nn.Module):
    """Waveforms (B, T) at ``sample_rate`` -> normalized log-mel (B, features, frames), frame lengths.

    Always computed in float32 (exact_float32: no autocast, no TF32): the power spectrum overflows half
    precision, and the targets are computed from these features.
    """

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        self.cfg = cfg
        self.win_length = int(cfg.window_size * cfg.sample_rate)
        self.hop_length = int(cfg.window_stride * cfg.sample_rate)
        self.n_fft = cfg.n_fft
        # Both are derived from the config, so checkpoints need not carry them.
        self.register_buffer("window", torch.hann_window(self.win_length, periodic=False), persistent=False)
        with torch.device("cpu"):  # also when the model is built on the meta device
            fb = torchaudio.functional.melscale_fbanks(
                n_freqs=cfg.n_fft // 2 + 1,
                f_min=0.0,
                f_max=cfg.sample_rate / 2,
                n_mels=cfg.features,
                sample_rate=cfg.sample_rate,
                norm="slaney",
                mel_scale="slaney",
            )  # (F, M)
        # On the device the module is built on (the window's), the meta device included.
        self.register_buffer("fb", fb.T.contiguous().to(self.window.device), persistent=False)  # (M, F)

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Valid frames for a number of samples (centered STFT, NeMo's get_seq_len)."""
        return torch.div(num_samples, self.hop_length, rounding_mode="floor").long()

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with exact_float32(audio.device.type), torch.no_grad():
            return self._forward(audio.float(), audio_lens)

    def _forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        feat_lens = self.num_frames(lens)  # (B,)
        if self.training and cfg.dither > 0:
            x = x + cfg.dither * torch.randn_like(x)
        if cfg.preemph:
            x = torch.cat([x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]], dim=1)
            x = x.masked_fill(~lengths_to_mask(lens, x.shape[1]), 0.0)
        spec = torch.stft(
            x,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # (B, F, T)
        power = torch.view_as_real(spec).pow(2).sum(-1)
        mel = torch.log(torch.matmul(self.fb, power) + cfg.log_zero_guard_value)  # (B, M, T)
        valid = lengths_to_mask(feat_lens, mel.shape[-1])[:, None, :]  # (B, 1, T)
        # Per-feature normalization over valid frames, unbiased std, as NeMo's normalize_batch.
        count = valid.sum(-1, keepdim=True)
        mean = torch.where(valid, mel, 0.0).sum(-1, keepdim=True) / count
        var = torch.where(valid, mel - mean, 0.0).pow(2).sum(-1, keepdim=True) / (count - 1.0)
        std = torch.nan_to_num(var.sqrt(), nan=0.0) + 1e-5
        mel = ((mel - mean) / std).masked_fill(~valid, 0.0)
        if cfg.pad_to > 0 and mel.shape[-1] % cfg.pad_to:
            mel = nn.functional.pad(mel, (0, cfg.pad_to - mel.shape[-1] % cfg.pad_to))
        return mel, feat_lens
