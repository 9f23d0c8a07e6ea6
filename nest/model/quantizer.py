"""Frozen random-projection quantizer (BEST-RQ), numerically as NeMo's RandomProjectionVectorQuantizer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F



@dataclass
class QuantizerConfig:
    """Frozen random-projection quantizer (BEST-RQ) producing the target tokens."""

    num_classes: int = 8192  # codewords per codebook (the decoder's classes)
    num_books: int = 1  # codebooks, one softmax each
    code_dim: int = 16  # dimension of the projection and the codewords
    dist_fn: str = "l2"  # l2 | cosine
    norm: str = "none"  # none (NeMo 3.0.0) | layer: LayerNorm (no affine) of each stacked input before the projection


class RandomProjectionQuantizer(nn.Module):
    """Clean features (B, D, T) -> target tokens (B, T // combine, num_books).

    ``combine`` consecutive frames are stacked so that one token covers one encoder frame. With
    ``norm="layer"`` each stacked vector is standardised (LayerNorm without affine: the quantizer stays
    frozen) before the projection, as NeMo's open pull request #15589 proposes, so that loud and quiet
    frames spread over the codebook alike; ``"none"`` is NeMo 3.0.0's quantizer.
    Computed in float32 (distances in float64, as NeMo's float64 codebooks make them), also under
    autocast, so the targets never depend on the training precision.
    """

    def __init__(self, cfg: QuantizerConfig, feat_in: int, combine: int):
        super().__init__()
        self.cfg = cfg
        self.combine = combine
        self.proj = nn.Linear(feat_in * combine, cfg.num_books * cfg.code_dim, bias=False)
        nn.init.xavier_normal_(self.proj.weight)
        codebooks = F.normalize(torch.randn(cfg.num_books, cfg.num_classes, cfg.code_dim, dtype=torch.float64), dim=-1)
        self.codebooks = nn.Parameter(codebooks)  # (N, C, code_dim)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        B, D, T = feats.shape
        n, d = self.cfg.num_books, self.cfg.code_dim
        with torch.autocast(feats.device.type, enabled=False):
            x = feats.float().transpose(1, 2).reshape(B, T // self.combine, self.combine * D)
            if self.cfg.norm == "layer":
                x = F.layer_norm(x, x.shape[-1:])
            x = F.normalize(self.proj(x).view(B, -1, n, d), dim=-1)  # (B, T', N, d)
            dots = torch.einsum("btnd,ncd->btnc", x.double(), self.codebooks.double())  # (B, T', N, C)
            if self.cfg.dist_fn == "cosine":
                return dots.argmax(-1)
            # |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, and |x|^2 does not change the argmin.
            c2 = self.codebooks.double().pow(2).sum(-1)  # (N, C)
            tokens = (c2 - 2 * dots).argmin(-1)  # (B, T', N)
            # Padded frames project to exactly zero, where all codewords tie up to rounding: break the
            # tie as NeMo's explicit distance does, so that targets match bit for bit.
            zero = x.abs().amax(-1) == 0  # (B, T', N)
            return torch.where(zero, self._zero_vector_tokens(), tokens)

    def _zero_vector_tokens(self) -> torch.Tensor:
        """(N,) the token NeMo assigns to a zero vector, computed with NeMo's own expression."""
        diff = torch.zeros(1, 1, *self.codebooks.shape[::2], 1, dtype=torch.float64, device=self.codebooks.device)
        diff = diff - self.codebooks.double().transpose(1, 2)[None, None]  # (1, 1, N, d, C)
        return diff.norm(dim=-2).argmin(-1)[0, 0]
