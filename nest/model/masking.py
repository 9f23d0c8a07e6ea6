"""Random block masking, as NeMo 3.0.0's RandomBlockMasking with allow_overlap=True, over the batch at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn



@dataclass
class MaskingConfig:
    """Random block masking of the (noisy) features before subsampling."""

    block_size: int = 40  # mel frames (10 ms each); post_conv masks block_size // subsampling_factor frames
    mask_prob: float = 0.01  # probability that a block starts at a given frame
    max_mask_ratio: float = 0.8  # kept for older configs: NeMo 3.0.0's overlapping masking does not use it


class RandomBlockMasking(nn.Module):
    """Samples frame masks and replaces masked frames by a frozen mask embedding.

    Every frame t with t + block_size <= length starts a block with probability ``mask_prob``; a frame
    is masked when a block started within the ``block_size`` frames up to it. The draw is NeMo's
    (one uniform per frame of the padded batch), so the same torch seed gives NeMo's masks.
    ``block_size`` is in the frames being masked: mel frames before subsampling, subsampled frames
    after it.
    """

    def __init__(self, cfg: MaskingConfig, feat_in: int, block_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size if block_size is None else block_size
        self.mask_embedding = nn.Parameter(torch.empty(feat_in).normal_(0.0, 0.1), requires_grad=False)

    def sample(self, lens: torch.Tensor, num_frames: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B,) valid frame counts -> (B, num_frames) bool frame mask."""
        block = self.block_size
        t = torch.arange(num_frames, device=lens.device)[None, :]  # (1, T)
        u = torch.rand(lens.shape[0], num_frames, device=lens.device, generator=generator)
        starts = (u < self.cfg.mask_prob) & (t + block <= lens[:, None])  # (B, T)
        # Frame t is masked when a block started in (t - block, t].
        c = nn.functional.pad(starts.int().cumsum(-1), (block, 0))  # (B, T + block)
        return (c[:, block:] - c[:, :-block]) > 0

    def apply(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feats (B, D, T), mask (B, T) -> feats with masked frames set to the mask embedding."""
        emb = self.mask_embedding.to(feats.dtype)[None, :, None]  # (1, D, 1)
        return torch.where(mask[:, None, :], emb, feats)
