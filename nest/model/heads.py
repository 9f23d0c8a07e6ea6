"""Decoder heads on the encoder's output (B, D, T'), and the perplexity of a token histogram."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


class MultiSoftmaxDecoder(nn.Module):
    """Encoded (B, D, T') -> log-probabilities (B, T', C, N), one softmax per codebook."""

    def __init__(self, d_model: int, num_classes: int, num_books: int, use_bias: bool):
        super().__init__()
        self.num_classes, self.num_books = num_classes, num_books
        self.decoder_layers = nn.Sequential(nn.Conv1d(d_model, num_classes * num_books, 1, bias=use_bias))
        nn.init.xavier_uniform_(self.decoder_layers[0].weight)
        if use_bias:
            nn.init.zeros_(self.decoder_layers[0].bias)

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        logits = self.decoder_layers(encoded).transpose(1, 2)  # (B, T', C * N)
        logits = logits.reshape(logits.shape[0], logits.shape[1], self.num_classes, self.num_books)
        return F.log_softmax(logits.float(), dim=2)


class ContrastiveDecoder(nn.Module):
    """NeMo's ConvASRDecoderReconstruction without stride layers: encoded (B, D, T') -> (B, T', out)."""

    def __init__(self, d_model: int, hidden: int, out: int):
        super().__init__()
        self.decoder_layers = nn.Sequential(nn.Conv1d(d_model, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, out, 1))
        for i in (0, 2):
            nn.init.xavier_uniform_(self.decoder_layers[i].weight)

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.decoder_layers(encoded).transpose(1, 2)


def code_counts(tokens: torch.Tensor, num_classes: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Histogram (N, C) of the tokens (B, T', N) over ``valid`` (B, T') steps; one scatter for all codebooks,
    -1 (no label) left out."""
    flat = tokens.reshape(-1, tokens.shape[-1]).T  # (N, B*T')
    weights = (torch.ones_like(tokens[..., 0]) if valid is None else valid).reshape(1, -1).float().expand_as(flat)
    weights = weights * (flat >= 0)
    return torch.zeros(flat.shape[0], num_classes, device=tokens.device).scatter_add_(1, flat.clamp(min=0), weights)


def counts_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of histograms (N, C), mean over codebooks."""
    p = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1)).mean()


def codebook_perplexity(tokens: torch.Tensor, num_classes: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """exp(entropy) of the token histogram (B, T', N) over ``valid`` (B, T') steps, mean over codebooks."""
    return counts_perplexity(code_counts(tokens, num_classes, valid))


def codes_used(counts: torch.Tensor) -> torch.Tensor:
    """Share of the C codes of histograms (N, C) that occur at least once, mean over codebooks."""
    return (counts > 0).float().mean()
