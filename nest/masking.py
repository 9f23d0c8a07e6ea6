"""Random block masking (NeMo's RandomBlockMasking with allow_overlap=True), vectorized over the batch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nest.config import MaskingConfig

SHORT_BLOCK = 8  # frames masked at the start of utterances too short for one block (as NeMo)


class RandomBlockMasking(nn.Module):
    """Samples frame masks and replaces masked frames by a frozen mask embedding.

    NeMo draws, per utterance of L frames, n ~ Binomial(L - block_size, p) distinct starts among the
    first L - block_size frames and masks ``block_size`` frames from each. That is the same law as an
    independent Bernoulli(p) start at every one of those frames, which is what is drawn here for the
    whole batch at once.
    """

    def __init__(self, cfg: MaskingConfig, feat_in: int):
        super().__init__()
        self.cfg = cfg
        self.mask_embedding = nn.Parameter(torch.empty(feat_in).normal_(0.0, 0.1), requires_grad=False)

    def sample(self, lens: torch.Tensor, num_frames: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B,) valid frame counts -> (B, num_frames) bool frame mask."""
        block = self.cfg.block_size
        t = torch.arange(num_frames, device=lens.device)[None, :]  # (1, T)
        num_starts = (lens - block).clamp(min=0)[:, None]  # (B, 1)
        u = torch.rand(lens.shape[0], num_frames, device=lens.device, generator=generator)
        starts = (u < self.cfg.mask_prob) & (t < num_starts)  # (B, T)
        # Frame t is masked when a block started in (t - block, t].
        c = nn.functional.pad(starts.int().cumsum(-1), (block, 0))  # (B, T + block)
        covered = (c[:, block:] - c[:, :-block]) > 0
        short = (block >= lens * self.cfg.max_mask_ratio)[:, None]
        short_mask = t < lens.clamp(max=SHORT_BLOCK)[:, None]
        return torch.where(short, short_mask, covered)

    def apply(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feats (B, D, T), mask (B, T) -> feats with masked frames set to the mask embedding."""
        emb = self.mask_embedding.to(feats.dtype)[None, :, None]  # (1, D, 1)
        return torch.where(mask[:, None, :], emb, feats)
