"""The NEST objective as one plain nn.Module: features, quantizer, masking, encoder, decoder, loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nest.model.features import lengths_to_mask
from nest.model.heads import MultiSoftmaxDecoder, code_counts, codebook_perplexity, codes_used
from nest.model.masking import RandomBlockMasking
from nest.model.precision import exact_float32
from nest.model.quantizer import RandomProjectionQuantizer
from nest.objectives.base import EncoderModel


@dataclass
class NestOutput:
    """What one forward pass gives; T' = frames / subsampling_factor, N = num_books, C = num_classes."""

    log_probs: torch.Tensor  # (B, T', C, N)
    encoded_lens: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, T', N) targets: from the clean audio, or k-means labels (-1: no label)
    frame_mask: torch.Tensor  # (B, T) bool, masked feature frames
    token_mask: torch.Tensor  # (B, T') bool, tokens that count in the loss
    loss: torch.Tensor  # scalar
    mask_lens: Optional[torch.Tensor] = None  # (B,) valid frames of frame_mask's time axis


def token_mask_from_frames(frame_mask: torch.Tensor, combine: int, threshold: float) -> torch.Tensor:
    """(B, T) frame mask -> (B, T // combine): a token is masked when over ``threshold`` of its frames are."""
    B, T = frame_mask.shape
    return frame_mask[:, : T // combine * combine].reshape(B, -1, combine).float().mean(-1) > threshold


def masked_token_loss(log_probs: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the targets over masked tokens and codebooks (NeMo's MultiMLMLoss); a target of -1 (a
    k-means label position without a label) is left out.

    A weighted mean rather than boolean indexing, so that it costs no host-device synchronisation;
    with nothing masked it is 0 (no signal, but finite and in the graph), where NeMo's is NaN.
    """
    T = min(log_probs.shape[1], tokens.shape[1], token_mask.shape[1])
    tokens = tokens[:, :T]
    nll = -log_probs[:, :T].gather(2, tokens.clamp(min=0)[:, :, None, :]).squeeze(2)  # (B, T', N)
    sel = token_mask[:, :T, None] & (tokens >= 0)  # (B, T', N)
    return torch.where(sel, nll, 0.0).sum() / sel.sum().clamp(min=1)


class NestModel(EncoderModel):
    """Denoising masked token prediction: targets from clean audio, predictions from masked noisy audio."""

    def build_targets(self) -> None:
        cfg, enc, q = self.cfg, self.cfg.encoder, self.cfg.quantizer
        feat_in = cfg.preprocessor.features
        self.post_conv = cfg.mask_position == "post_conv"
        # With model.targets=kmeans the targets are data (cut.targets, prepare.py kmeans): no quantizer.
        quantize = cfg.targets == "random_projection"
        if self.post_conv:
            # NeMo's post_conv: tokens from the subsampled clean features, one per encoder frame, and
            # masks of block_size // subsampling_factor subsampled frames.
            self.quantizer = RandomProjectionQuantizer(q, enc.d_model, 1) if quantize else None
            self.mask_processor = RandomBlockMasking(cfg.masking, enc.d_model,
                                                     cfg.masking.block_size // enc.subsampling_factor)
        else:
            self.quantizer = RandomProjectionQuantizer(q, feat_in, enc.subsampling_factor) if quantize else None
            self.mask_processor = RandomBlockMasking(cfg.masking, feat_in)

    def build_heads(self) -> None:
        cfg, enc, q = self.cfg, self.cfg.encoder, self.cfg.quantizer
        if self.post_conv:
            # NeMo detaches the masked subsampled features, so the subsampling never learns: it stays
            # a fixed random feature extractor, like the quantizer, and the targets cannot drift.
            # Frozen here, which is the same and keeps DDP free of parameters without gradients.
            self.encoder.pre_encode.requires_grad_(False)
        self.decoder = MultiSoftmaxDecoder(enc.d_model, q.num_classes, q.num_books, cfg.decoder_use_bias)
        # Target histogram (N, C) of the training steps since the last metrics(): not a buffer, so that it
        # is neither saved nor broadcast by DDP; on the device, read without a sync.
        self.window_counts: Optional[torch.Tensor] = None

    def forward(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        noisy_audio: torch.Tensor,
        noisy_audio_lens: torch.Tensor,
        frame_mask: Optional[torch.Tensor] = None,
        apply_mask: bool = True,
        targets: Optional[torch.Tensor] = None,
    ) -> NestOutput:
        """Clean ``audio`` (B, S) gives targets; ``noisy_audio`` (B, S) is masked and encoded.

        ``frame_mask`` (B, T) replaces the random masks (for reproducing a given draw); T is the mel
        frames, or the subsampled frames with ``mask_position=post_conv``. ``targets`` (B, T', N), -1 where
        there is no label, replace the quantizer's tokens (model.targets=kmeans).
        """
        if targets is None and self.quantizer is None:
            raise ValueError("model.targets=kmeans: the batch carries no targets (train on cuts from prepare.py kmeans)")
        if targets is None:
            feats, feat_lens = self.preprocessor(audio, audio_lens)
        noisy_feats, noisy_lens = self.preprocessor(noisy_audio, noisy_audio_lens)
        if self.post_conv:
            if targets is None:
                # The targets' inputs in float32 as the features and the quantizer are, not in the training
                # precision (bf16 autocast changed 0.8% of NEST-L's tokens; cuDNN convolutions are TF32 by default).
                with torch.no_grad(), exact_float32(feats.device.type):
                    clean, _ = self.encoder.pre_encode(feats.transpose(1, 2), feat_lens)  # (B, T', D)
                tokens = self.quantizer(clean.transpose(1, 2))
            x, mask_lens = self.encoder.pre_encode(noisy_feats.transpose(1, 2), noisy_lens)
            x = x.transpose(1, 2)  # (B, D, T')
        else:
            if targets is None:
                tokens = self.quantizer(feats)
            x, mask_lens = noisy_feats, noisy_lens
        if targets is not None:
            tokens = targets
        if frame_mask is None:
            if apply_mask:
                frame_mask = self.mask_processor.sample(mask_lens, x.shape[-1])
            else:
                frame_mask = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.bool, device=x.device)
        masked = self.mask_processor.apply(x, frame_mask)
        if self.post_conv:
            encoded, encoded_lens = self.encoder(masked.transpose(1, 2), mask_lens, bypass_pre_encode=True)
            combine = 1
        else:
            encoded, encoded_lens = self.encoder(masked, noisy_lens)
            combine = self.cfg.encoder.subsampling_factor
        log_probs = self.decoder(encoded)
        token_mask = token_mask_from_frames(frame_mask, combine, self.cfg.mask_threshold)
        loss = masked_token_loss(log_probs, tokens, token_mask)
        if self.training:
            counts = code_counts(tokens, self.cfg.quantizer.num_classes, lengths_to_mask(encoded_lens, tokens.shape[1]))
            self.window_counts = counts if self.window_counts is None else self.window_counts + counts
        return NestOutput(log_probs, encoded_lens, tokens, frame_mask, token_mask, loss, mask_lens)

    masked_metrics = frozenset({"masked_accuracy"})

    def has_loss(self, out: NestOutput) -> torch.Tensor:
        T = min(out.log_probs.shape[1], out.tokens.shape[1], out.token_mask.shape[1])
        return (out.token_mask[:, :T, None] & (out.tokens[:, :T] >= 0)).any()

    @torch.no_grad()
    def metrics(self, out: NestOutput) -> dict[str, torch.Tensor]:
        """Scalar tensors for logging steps only (computing them every step would waste device time).

        masked_accuracy: share of masked tokens (all codebooks) predicted right; target_perplexity:
        exp(entropy) of the target tokens of valid frames, averaged over codebooks (codes in use);
        masked_fraction: share of valid frames masked; in training, codes_used: share of the codes (mean over
        codebooks) that were targets of a valid frame in any training step since the last call (the logging
        window of this rank). No host-device synchronisation.
        """
        T = min(out.log_probs.shape[1], out.tokens.shape[1], out.token_mask.shape[1])
        tokens = out.tokens[:, :T]  # (B, T', N)
        sel = out.token_mask[:, :T, None] & (tokens >= 0)  # (B, T', N)
        correct = (out.log_probs[:, :T].argmax(2) == tokens) & sel
        accuracy = correct.sum() / sel.sum().clamp(min=1)
        valid = lengths_to_mask(out.encoded_lens, tokens.shape[1])  # (B, T')
        perplexity = codebook_perplexity(tokens, self.cfg.quantizer.num_classes, valid)
        metrics = {"masked_accuracy": accuracy, "target_perplexity": perplexity}
        if self.training and self.window_counts is not None:
            metrics["codes_used"] = codes_used(self.window_counts)
            self.window_counts = None  # the next window starts
        if out.mask_lens is not None:
            frames = lengths_to_mask(out.mask_lens, out.frame_mask.shape[1])
            metrics["masked_fraction"] = (out.frame_mask & frames).sum() / frames.sum().clamp(min=1)
        return metrics
