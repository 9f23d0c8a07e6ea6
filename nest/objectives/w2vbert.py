"""The Wav2vec-BERT objective as one plain nn.Module, numerically as NeMo 3.0.0's SpeechEncDecSelfSupervisedModel.

Features of the clean audio are stacked 8 frames per encoder step and quantized (Gumbel vector
quantizer): those are the targets. The encoder sees the (noisy) features with time patches and
frequency bands zeroed; at masked steps a contrastive decoder must pick its step's target among
negatives drawn from other masked steps of the utterance, and an MLM decoder must predict the
quantizer's ids. The preprocessor and the FastConformer encoder are NEST's, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from nest.model.features import lengths_to_mask
from nest.model.heads import ContrastiveDecoder, MultiSoftmaxDecoder, code_counts, codes_used, counts_perplexity
from nest.objectives.base import EncoderModel
from nest.objectives.w2vbert_loss import (
    GumbelVectorQuantizer,
    contrastive_logits,
    contrastive_loss,
    mlm_loss,
    negatives_from_ranks,
    sample_negatives,
    stack_steps,
    step_mask_from_spec,
)


@dataclass
class W2vBertOutput:
    """What one forward pass gives; T' = frames / subsampling_factor, P = decoder_out, K = num_negatives."""

    loss: torch.Tensor  # scalar: contrastive_alpha * contrastive_loss + mlm_alpha * mlm_loss (from mlm_start_step)
    encoded_lens: torch.Tensor  # (B,)
    contrastive_loss: torch.Tensor  # scalar, unweighted, the diversity penalty included (as NeMo)
    mlm_loss: torch.Tensor  # scalar, unweighted; 0 with mlm off
    prob_ppl: torch.Tensor  # scalar codebook diversity penalty, (G V - perplexity) / (G V); 0 without quantizer
    decoder_out: torch.Tensor  # (B, T', P) contrastive decoder output
    logits: torch.Tensor  # (B, T', 1 + K) similarities / logit_temp, the step's own target first
    target_ids: Optional[torch.Tensor]  # (B, T') quantizer ids, groups combined: the MLM targets
    codes: Optional[torch.Tensor]  # (B, T', G) quantizer argmax per group
    mlm_log_probs: Optional[torch.Tensor]  # (B, T', V ** G + 1), with NeMo's unused blank class last
    frame_mask: torch.Tensor  # (B, T) bool, masked time patches
    freq_mask: torch.Tensor  # (B, F) bool, masked frequency bands
    step_mask: torch.Tensor  # (B, T') bool, steps that count in both losses


def sample_patch_mask(
    lens: torch.Tensor, num_frames: int, patch_size: int, mask_patches: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """NeMo's MaskedPatchAugmentation time masks: (B,) frame counts -> (B, num_frames) bool.

    The number of patches n comes from the shortest utterance: ``mask_patches`` < 1 is a fraction of
    its frames, rounded up to whole patches; at most as many patches as it holds. Every utterance
    then gets n distinct patches among its own whole patches (aligned to multiples of ``patch_size``),
    uniformly. Computed on the device: n is never read on the host.
    """
    B = lens.shape[0]
    min_len = lens.min()
    if mask_patches >= 1:
        n = torch.full_like(min_len, int(mask_patches))
    else:
        masked_frames = (min_len * mask_patches).long()  # NeMo's int(), from a float32 product
        n = torch.div(masked_frames + patch_size - 1, patch_size, rounding_mode="floor")
    n = torch.where(min_len < patch_size * n, torch.div(min_len, patch_size, rounding_mode="floor"), n)
    P = num_frames // patch_size
    whole = torch.div(lens, patch_size, rounding_mode="floor")[:, None]  # (B, 1) patches per utterance
    keys = torch.rand(B, P, device=lens.device, generator=generator)
    keys = keys.masked_fill(torch.arange(P, device=lens.device)[None, :] >= whole, 2.0)
    chosen = keys.argsort(-1).argsort(-1) < n  # (B, P): the n smallest keys among the utterance's patches
    mask = chosen[:, :, None].expand(B, P, patch_size).reshape(B, P * patch_size)
    return F.pad(mask, (0, num_frames - P * patch_size))


def sample_freq_mask(
    batch: int, features: int, num_masks: int, width: int, device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """NeMo's SpecAugment frequency masks (vectorized code): (B, features) bool.

    Each of ``num_masks`` bands has a width drawn from [0, width) and a start from [0, features - width).
    """
    w = (torch.rand(batch, num_masks, device=device, generator=generator) * width).long()
    start = (torch.rand(batch, num_masks, device=device, generator=generator) * (features - w)).long()
    f = torch.arange(features, device=device)[None, None, :]
    return ((f >= start[..., None]) & (f < (start + w)[..., None])).any(1)


class W2vBertModel(EncoderModel):
    """Contrastive + masked LM pretraining: targets from clean audio, predictions from masked noisy audio."""

    def build_heads(self) -> None:
        w, enc = self.cfg.w2vbert, self.cfg.encoder
        feat_in = self.cfg.preprocessor.features
        self.combine = enc.subsampling_factor  # frames per encoder step, and per target
        self.contrastive_decoder = ContrastiveDecoder(enc.d_model, w.decoder_out, w.decoder_out)
        if w.quantized_targets:
            temp = (w.quantizer_temp_start, w.quantizer_temp_min, w.quantizer_temp_decay)
            self.quantizer = GumbelVectorQuantizer(feat_in * self.combine, w.codebook_size, w.num_groups,
                                                   w.decoder_out, temp, w.quantizer_weight_std, w.quantizer_norm)
        else:
            self.target_proj = nn.Linear(feat_in * self.combine, w.decoder_out)
        if w.mlm:
            # NeMo's ConvASRDecoder adds a blank class that no target uses.
            self.mlm_decoder = MultiSoftmaxDecoder(enc.d_model, w.codebook_size**w.num_groups + 1, 1, True)
        self.num_updates = 0

    def set_num_updates(self, step: int) -> None:
        """The training step: sets the Gumbel temperature and whether the MLM loss counts yet."""
        self.num_updates = step
        if self.cfg.w2vbert.quantized_targets:
            self.quantizer.set_num_updates(step)

    def forward(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        noisy_audio: torch.Tensor,
        noisy_audio_lens: torch.Tensor,
        frame_mask: Optional[torch.Tensor] = None,
        freq_mask: Optional[torch.Tensor] = None,
        negatives: Optional[torch.Tensor] = None,
    ) -> W2vBertOutput:
        """Clean ``audio`` (B, S) gives targets; ``noisy_audio`` (B, S) is masked and encoded.

        Pass the same tensor twice when there is no noise: the features are then computed once, as
        NeMo does. ``frame_mask`` (B, T) and ``freq_mask`` (B, F) replace the random masks, and
        ``negatives`` (M, K), NeMo's recorded ranks, the random negatives (to reproduce a given draw).
        """
        w = self.cfg.w2vbert
        feats, feat_lens = self.preprocessor(audio, audio_lens)  # (B, F, T)
        if noisy_audio is audio and noisy_audio_lens is audio_lens:
            noisy_feats, lens = feats, feat_lens
        else:
            noisy_feats, lens = self.preprocessor(noisy_audio, noisy_audio_lens)
        B, F_, T = noisy_feats.shape
        if frame_mask is None:
            frame_mask = sample_patch_mask(lens, T, w.patch_size, w.mask_patches)
        if freq_mask is None:
            freq_mask = sample_freq_mask(B, F_, w.freq_masks, w.freq_width, feats.device)
        masked = frame_mask[:, None, :] | freq_mask[:, :, None]  # (B, F, T)
        encoded, encoded_lens = self.encoder(noisy_feats.masked_fill(masked, 0.0), lens)
        # NeMo finds the masked values as those within 1e-5 of zero; here they are known.
        spec_mask = masked & lengths_to_mask(lens, T)[:, None, :]
        out = self.losses(feats, spec_mask, encoded, negatives)
        return W2vBertOutput(encoded_lens=encoded_lens, frame_mask=frame_mask, freq_mask=freq_mask, **out)

    def losses(
        self, feats: torch.Tensor, spec_mask: torch.Tensor, encoded: torch.Tensor, negatives: Optional[torch.Tensor]
    ) -> dict:
        """Clean features (B, F, T), masked values (B, F, T) bool, encoded (B, D, T') -> the loss terms."""
        w = self.cfg.w2vbert
        T = encoded.shape[-1]
        steps = stack_steps(feats, T, self.combine)  # (B, T', combine * F)
        step_mask = step_mask_from_spec(spec_mask, T, self.combine, w.mask_threshold)  # (B, T')
        codes = target_ids = mlm_log_probs = None
        prob_ppl = encoded.new_zeros((), dtype=torch.float32)
        if w.quantized_targets:
            targets, codes, sampled, prob_ppl = self.quantizer(steps)
            target_ids = self.quantizer.combine_ids(codes)
            keys = self.quantizer.combine_ids(sampled)  # equal keys <=> equal target vectors
        else:
            targets = self.target_proj(steps)
            # Continuous targets: a negative equals the positive when it is the step itself.
            keys = torch.arange(T, device=steps.device).expand(steps.shape[0], T)
        if negatives is None:
            neg = sample_negatives(step_mask, w.num_negatives)
        else:
            neg = negatives_from_ranks(step_mask, negatives)
        decoder_out = self.contrastive_decoder(encoded)
        logits = contrastive_logits(decoder_out, targets, keys, neg, w.logit_temp)
        contrastive = contrastive_loss(logits, step_mask, prob_ppl if w.quantized_targets else None,
                                       w.prob_ppl_weight, w.reduce, w.multiplier)
        loss = w.contrastive_alpha * contrastive
        mlm = torch.zeros_like(contrastive)
        if w.mlm:
            mlm_log_probs = self.mlm_decoder(encoded)[..., 0]  # (B, T', V ** G + 1)
            mlm = mlm_loss(mlm_log_probs, target_ids, step_mask)
            # Before mlm_start_step NeMo leaves the MLM loss out; weight 0 keeps its decoder in the graph.
            loss = loss + (w.mlm_alpha if self.num_updates >= w.mlm_start_step else 0.0) * mlm
        return dict(loss=loss, contrastive_loss=contrastive, mlm_loss=mlm, prob_ppl=prob_ppl,
                    decoder_out=decoder_out, logits=logits, target_ids=target_ids, codes=codes,
                    mlm_log_probs=mlm_log_probs, step_mask=step_mask)

    masked_metrics = frozenset({"contrastive_loss", "mlm_loss", "contrastive_accuracy", "mlm_accuracy"})

    def has_loss(self, out: W2vBertOutput) -> torch.Tensor:
        return out.step_mask.any()

    @torch.no_grad()
    def metrics(self, out: W2vBertOutput) -> dict[str, torch.Tensor]:
        """Scalars for logging (computed on the device, no sync): loss parts, accuracies, codebook use."""
        mask = out.step_mask
        n = mask.sum().clamp(min=1)
        valid = lengths_to_mask(out.encoded_lens, mask.shape[1])
        m = {
            "contrastive_loss": out.contrastive_loss.detach(),
            "mlm_loss": out.mlm_loss.detach(),
            # Positive ranked first among itself and its negatives.
            "contrastive_accuracy": ((out.logits.argmax(-1) == 0) & mask).sum() / n,
            "masked_fraction": (mask & valid).sum() / valid.sum().clamp(min=1),
        }
        if out.codes is not None:
            V = self.cfg.w2vbert.codebook_size
            m["prob_ppl"] = out.prob_ppl.detach()
            counts = code_counts(out.codes, V, valid)  # (G, V) argmax codes of this batch's valid steps
            m["codebook_perplexity"] = counts_perplexity(counts)
            m["codes_used"] = codes_used(counts)
            m["gumbel_temperature"] = torch.full((), self.quantizer.curr_temp, device=mask.device)  # no host copy
        if out.mlm_log_probs is not None:
            m["mlm_accuracy"] = ((out.mlm_log_probs.argmax(-1) == out.target_ids) & mask).sum() / n
        return m
