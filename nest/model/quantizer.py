"""Frozen random-projection quantizer (BEST-RQ), numerically as NeMo's RandomProjectionVectorQuantizer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from nest.model.precision import exact_float32


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
    Computed in float32 (exact_float32: no autocast, no TF32; distances in float64, as NeMo's float64 codebooks
    make them), so the targets never depend on the training precision. Distances are computed for
    ``chunk_elements`` (frame, codeword) pairs at a time, in place: their memory does not grow with the batch
    (all at once, they are a (B, T', N, C) float64 tensor, 4 GB at 62k tokens and 8192 codewords).
    """

    chunk_elements = 2**25  # float64: 256 MiB; a class attribute so that tests can force chunks on small inputs

    def __init__(self, cfg: QuantizerConfig, feat_in: int, combine: int):
        super().__init__()
        self.cfg = cfg
        self.combine = combine
        self.proj = nn.Linear(feat_in * combine, cfg.num_books * cfg.code_dim, bias=False)
        nn.init.xavier_normal_(self.proj.weight)
        codebooks = F.normalize(torch.randn(cfg.num_books, cfg.num_classes, cfg.code_dim, dtype=torch.float64), dim=-1)
        self.codebooks = nn.Parameter(codebooks)  # (N, C, code_dim)
        self.requires_grad_(False)
        self._zero_tokens: tuple = (None, None)  # (codebooks' device, dtype, version), tokens

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        B, D, T = feats.shape
        n, d = self.cfg.num_books, self.cfg.code_dim
        with exact_float32(feats.device.type):
            x = feats.float().transpose(1, 2).reshape(B, T // self.combine, self.combine * D)
            if self.cfg.norm == "layer":
                x = F.layer_norm(x, x.shape[-1:])
            x = F.normalize(self.proj(x).view(*x.shape[:2], n, d), dim=-1)  # (B, T', N, d)
            codebooks = self.codebooks.double()
            # |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, and |x|^2 does not change the argmin.
            c2 = codebooks.pow(2).sum(-1)  # (N, C)
            rows = max(1, self.chunk_elements // (n * self.cfg.num_classes))
            flat = x.double().reshape(-1, n, d)  # (B*T', N, d)
            tokens = torch.cat([self._nearest(part, codebooks, c2) for part in flat.split(rows)]).view(*x.shape[:3])
            if self.cfg.dist_fn == "cosine":
                return tokens
            # Padded frames project to exactly zero, where all codewords tie up to rounding: break the
            # tie as NeMo's explicit distance does, so that targets match bit for bit.
            zero = x.abs().amax(-1) == 0  # (B, T', N)
            return torch.where(zero, self.zero_vector_tokens(), tokens)

    def _nearest(self, x: torch.Tensor, codebooks: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
        """(R, N, d) float64 -> (R, N) nearest codeword of each codebook."""
        dots = torch.einsum("rnd,ncd->rnc", x, codebooks)  # (R, N, C)
        if self.cfg.dist_fn == "cosine":
            return dots.argmax(-1)
        return dots.mul_(-2).add_(c2).argmin(-1)  # |c|^2 - 2 x.c, in place

    def zero_vector_tokens(self) -> torch.Tensor:
        """(N,) the token NeMo assigns to a zero vector, computed with NeMo's own expression once per codebook
        state (recomputed after a weight load or a move: the codebooks' version, device or dtype change)."""
        key = (self.codebooks.device, self.codebooks.dtype, self.codebooks._version)
        if self._zero_tokens[0] != key:
            diff = torch.zeros(1, 1, *self.codebooks.shape[::2], 1, dtype=torch.float64, device=self.codebooks.device)
            diff = diff - self.codebooks.double().transpose(1, 2)[None, None]  # (1, 1, N, d, C)
            self._zero_tokens = (key, diff.norm(dim=-2).argmin(-1)[0, 0])
        return self._zero_tokens[1]
