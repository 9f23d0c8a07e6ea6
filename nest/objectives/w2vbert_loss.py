"""Wav2vec-BERT losses, numerically as NeMo 3.0.0's ContrastiveLoss, GumbelVectorQuantizer and MLMLoss.

Everything here is vectorized over the batch with static shapes, so a training step never waits on the
device: NeMo gathers the masked steps with boolean indexing (a host-device sync, and wrong results when
utterances have different numbers of masked steps, NeMo issue #4589) and sizes the negative draw on
the host. Here every step of every utterance is scored and the unmasked ones are weighted out; the
negatives of a step are drawn from the masked steps of its own utterance, however many there are.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from nest.model.precision import autocast_off


class GumbelVectorQuantizer(nn.Module):
    """Stacked feature steps (B, T', dim) -> quantized vectors (B, T', vq_dim), ids, diversity penalty.

    NeMo's GumbelVectorQuantizer with ``combine_groups=True`` (one codebook of ``num_vars`` vectors of
    ``vq_dim / groups`` shared by the groups), ``time_first=True`` and a single projection layer. In
    training the codewords are Gumbel-softmax samples (hard, straight-through) at temperature
    ``curr_temp``; in eval the argmax. Always computed in float32, also under autocast. ``weight_std`` (NeMo:
    1.0) and ``norm`` (``"layer"``: a LayerNorm without affine on each input step; NeMo: ``"none"``) are ours.
    """

    def __init__(self, dim: int, num_vars: int, groups: int, vq_dim: int, temp: tuple[float, float, float],
                 weight_std: float = 1.0, norm: str = "none"):
        super().__init__()
        self.num_vars, self.groups, self.norm = num_vars, groups, norm
        self.vars = nn.Parameter(torch.empty(1, num_vars, vq_dim // groups).uniform_())  # (1, V, d)
        self.weight_proj = nn.Linear(dim, groups * num_vars)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=weight_std)
        nn.init.zeros_(self.weight_proj.bias)
        self.max_temp, self.min_temp, self.temp_decay = temp
        self.curr_temp = self.max_temp

    def set_num_updates(self, num_updates: int) -> None:
        """Gumbel temperature at a training step: max(start * decay ** step, min)."""
        self.curr_temp = max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T', dim) -> vectors (B, T', vq_dim), argmax codes (B, T', G), codes of the vectors
        (B, T', G; the Gumbel samples in training), diversity penalty (scalar, NeMo's quantize_prob_ppl)."""
        B, T, _ = x.shape
        G, V = self.groups, self.num_vars
        with autocast_off(x.device.type):
            x = F.layer_norm(x.float(), x.shape[-1:]) if self.norm == "layer" else x.float()
            logits = self.weight_proj(x).view(B * T, G, V)
            codes = logits.argmax(-1)  # (B*T', G)
            # Over every step of the batch, padding included, as NeMo computes it.
            avg_probs = torch.softmax(logits, dim=-1).mean(dim=0)  # (G, V)
            perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7), dim=-1)).sum()
            prob_ppl = (V * G - perplexity) / (V * G)
            if self.training:
                weights = F.gumbel_softmax(logits, tau=self.curr_temp, hard=True)  # (B*T', G, V)
                sampled = weights.argmax(-1)
            else:
                weights = F.one_hot(codes, V).to(logits.dtype)
                sampled = codes
            vectors = torch.matmul(weights, self.vars[0].float())  # (B*T', G, d), exactly a codeword per group
        return vectors.reshape(B, T, -1), codes.view(B, T, G), sampled.view(B, T, G), prob_ppl

    def combine_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., G) codes -> (...) one id in [0, V ** G), the first group most significant (as NeMo)."""
        ids = torch.zeros_like(codes[..., 0])
        for g in range(self.groups):
            ids = ids * self.num_vars + codes[..., g]
        return ids


def stack_steps(x: torch.Tensor, num_steps: int, combine: int) -> torch.Tensor:
    """(B, F, T) -> (B, num_steps, combine * F): ``combine`` consecutive frames per step, zero-padded."""
    x = x.transpose(1, 2)  # (B, T, F)
    pad = num_steps * combine - x.shape[1]
    if pad > 0:
        x = F.pad(x, (0, 0, 0, pad))
    return x[:, : num_steps * combine].reshape(x.shape[0], num_steps, -1)


def step_mask_from_spec(spec_mask: torch.Tensor, num_steps: int, combine: int, threshold: float) -> torch.Tensor:
    """(B, F, T) bool, masked feature values -> (B, T') bool: over ``threshold`` of a step's values masked."""
    return stack_steps(spec_mask.float(), num_steps, combine).mean(-1) > threshold


def masked_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T') bool -> (B, T') positions, masked ones first in time order, then the others."""
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)


def sample_negatives(mask: torch.Tensor, num_negatives: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Positions (B, T', K) of K negatives for every step, drawn from the masked steps of its utterance.

    NeMo's law per utterance: K distinct masked steps, uniformly (the step itself included), or with
    replacement when the utterance has fewer than K masked steps (NeMo 3.0.0's answer to issue #4587).
    An utterance with a single masked step gets only itself (masked out as equal to the positive, so
    its loss is 0); one with none gets arbitrary positions that no masked step uses. Unlike NeMo, which
    draws one table of ranks for the whole batch, utterances draw independently.
    """
    B, T = mask.shape
    K = num_negatives
    counts = mask.sum(1, keepdim=True)  # (B, 1)
    order = masked_positions(mask)
    u = torch.rand(B, T, K, device=mask.device, generator=generator)
    ranks = torch.minimum((u * counts[..., None]).long(), (counts[..., None] - 1).clamp(min=0))  # (B, T', K)
    with_replacement = order.gather(1, ranks.view(B, -1)).view(B, T, K)
    if K > T:
        return with_replacement
    # K distinct uniformly: the K smallest of i.i.d. uniform keys over the candidates.
    keys = torch.rand(B, T, T, device=mask.device, generator=generator).masked_fill(~mask[:, None, :], 2.0)
    distinct = keys.topk(K, dim=-1, largest=False).indices  # (B, T', K)
    return torch.where((counts >= K)[..., None], distinct, with_replacement)


def negatives_from_ranks(mask: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """NeMo's recorded draw -> positions (B, T', K).

    ``ranks`` (M, K) is what ContrastiveLoss.sample_negatives returns: for the r-th masked step of every
    utterance, the ranks of its negatives among the M masked steps of the same utterance. It only
    exists when every utterance has M masked steps; checking that costs a sync (not for training).
    """
    M, K = ranks.shape
    counts = mask.sum(1)
    if not bool((counts == M).all()):
        raise ValueError(f"negatives of shape {tuple(ranks.shape)} need {M} masked steps in every utterance; "
                         f"the masks give {counts.tolist()}")
    B, T = mask.shape
    query_rank = (mask.long().cumsum(1) - 1).clamp(0, max(M - 1, 0))  # (B, T')
    neg_ranks = ranks.to(mask.device)[query_rank]  # (B, T', K)
    return masked_positions(mask).gather(1, neg_ranks.view(B, -1)).view(B, T, K)


def contrastive_logits(
    outputs: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor, negatives: torch.Tensor, logit_temp: float
) -> torch.Tensor:
    """Similarity logits (B, T', 1 + K): the step's own target first, then its negatives.

    Cosine similarity / ``logit_temp`` between decoder outputs (B, T', P) and targets (B, T', P) for
    every pair of steps of an utterance (B x T'^2 scores, far less memory than gathering K target
    vectors per step); a negative whose ``keys`` (B, T') equals the step's own is -inf, as NeMo sets
    negatives identical to the positive.
    """
    B, T, K = negatives.shape
    with autocast_off(outputs.device.type):
        out = F.normalize(outputs.float(), dim=-1, eps=1e-8)
        tgt = F.normalize(targets.float(), dim=-1, eps=1e-8)
        sim = torch.bmm(out, tgt.transpose(1, 2)) / logit_temp  # (B, T' query, T' target)
        pos = sim.diagonal(dim1=1, dim2=2)[..., None]  # (B, T', 1)
        neg = sim.gather(2, negatives)  # (B, T', K)
        same = keys.gather(1, negatives.view(B, -1)).view(B, T, K) == keys[..., None]
        return torch.cat([pos, neg.masked_fill(same, float("-inf"))], dim=-1)


def contrastive_loss(
    logits: torch.Tensor, mask: torch.Tensor, prob_ppl: Optional[torch.Tensor], prob_ppl_weight: float,
    reduce: str, multiplier: float,
) -> torch.Tensor:
    """NeMo's ContrastiveLoss value from the logits (B, T', 1 + K) and the step mask (B, T').

    Cross-entropy of the positive over masked steps (summed, or averaged with ``reduce=mean``), plus
    ``prob_ppl_weight * prob_ppl * masked steps``, all times ``multiplier / B``. No masked step: 0
    (NeMo: 0 with ``sum``, NaN with ``mean``).
    """
    ce = torch.logsumexp(logits, dim=-1) - logits[..., 0]  # (B, T')
    count = mask.sum()
    loss = torch.where(mask, ce, 0.0).sum()
    if reduce == "mean":
        loss = loss / count.clamp(min=1)
    if prob_ppl is not None and prob_ppl_weight != 0:
        loss = loss + prob_ppl_weight * prob_ppl * count
    return loss * (multiplier / logits.shape[0])


def mlm_loss(log_probs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NeMo's MLMLoss: mean NLL of the ids (B, T') over masked steps (B, T'); 0 when none (NeMo: NaN)."""
    nll = -log_probs.gather(-1, ids[..., None]).squeeze(-1)  # (B, T')
    return torch.where(mask, nll, 0.0).sum() / mask.sum().clamp(min=1)
