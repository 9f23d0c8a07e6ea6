"""The NEST model as one plain nn.Module: features, quantizer, masking, encoder, decoder, loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from nest.config import ModelConfig
from nest.conformer import ConformerEncoder
from nest.features import MelFeatures
from nest.masking import RandomBlockMasking
from nest.quantizer import RandomProjectionQuantizer


@dataclass
class NestOutput:
    """What one forward pass gives; T' = frames / subsampling_factor, N = num_books, C = num_classes."""

    log_probs: torch.Tensor  # (B, T', C, N)
    encoded_lens: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, T', N) targets from the clean audio
    frame_mask: torch.Tensor  # (B, T) bool, masked feature frames
    token_mask: torch.Tensor  # (B, T') bool, tokens that count in the loss
    loss: torch.Tensor  # scalar


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


def token_mask_from_frames(frame_mask: torch.Tensor, combine: int, threshold: float) -> torch.Tensor:
    """(B, T) frame mask -> (B, T // combine): a token is masked when over ``threshold`` of its frames are."""
    B, T = frame_mask.shape
    return frame_mask[:, : T // combine * combine].reshape(B, -1, combine).float().mean(-1) > threshold


def masked_token_loss(log_probs: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the targets over masked tokens and codebooks (NeMo's MultiMLMLoss); a target of -1 (a
    k-means label position without a label) is left out."""
    T = min(log_probs.shape[1], tokens.shape[1], token_mask.shape[1])
    tokens = tokens[:, :T]
    nll = -log_probs[:, :T].gather(2, tokens.clamp(min=0)[:, :, None, :]).squeeze(2)  # (B, T', N)
    w = (token_mask[:, :T, None] & (tokens >= 0)).to(nll.dtype)
    # A weighted mean, not boolean indexing: no host sync. Nothing masked gives 0, still in the graph.
    return (nll * w).sum() / w.sum().clamp(min=1)


def codebook_perplexity(tokens: torch.Tensor, num_classes: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """exp(entropy) of the token histogram (B, T', N) over ``valid`` (B, T') steps, mean over codebooks."""
    flat = tokens.reshape(-1, tokens.shape[-1]).T  # (N, B*T')
    weights = (torch.ones_like(tokens[..., 0]) if valid is None else valid).reshape(1, -1).float().expand_as(flat)
    weights = weights * (flat >= 0)  # -1: no label
    counts = torch.zeros(flat.shape[0], num_classes, device=tokens.device).scatter_add_(1, flat.clamp(min=0), weights)
    p = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum(-1)).mean()


class NestModel(nn.Module):
    """Denoising masked token prediction: targets from clean audio, predictions from masked noisy audio."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        enc, q = cfg.encoder, cfg.quantizer
        feat_in = cfg.preprocessor.features
        self.preprocessor = MelFeatures(cfg.preprocessor)
        # With model.targets=kmeans the targets are data (cut.targets, prepare.py kmeans): no quantizer.
        self.quantizer = RandomProjectionQuantizer(q, feat_in, enc.subsampling_factor) \
            if cfg.targets == "random_projection" else None
        self.mask_processor = RandomBlockMasking(cfg.masking, feat_in)
        self.encoder = ConformerEncoder(enc, feat_in)
        self.decoder = MultiSoftmaxDecoder(enc.d_model, q.num_classes, q.num_books, cfg.decoder_use_bias)

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

        ``frame_mask`` (B, T) replaces the random masks (for reproducing a given draw). ``targets`` (B, T', N),
        -1 where there is no label, replace the quantizer's tokens (model.targets=kmeans).
        """
        if targets is not None:
            tokens = targets
        elif self.quantizer is None:
            raise ValueError("model.targets=kmeans: the batch carries no targets (train on cuts from prepare.py kmeans)")
        else:
            feats, _ = self.preprocessor(audio, audio_lens)
            tokens = self.quantizer(feats)
        noisy_feats, noisy_lens = self.preprocessor(noisy_audio, noisy_audio_lens)
        if frame_mask is None:
            if apply_mask:
                frame_mask = self.mask_processor.sample(noisy_lens, noisy_feats.shape[-1])
            else:
                frame_mask = torch.zeros(noisy_feats.shape[0], noisy_feats.shape[-1], dtype=torch.bool,
                                         device=noisy_feats.device)
        masked = self.mask_processor.apply(noisy_feats, frame_mask)
        encoded, encoded_lens = self.encoder(masked, noisy_lens)
        log_probs = self.decoder(encoded)
        token_mask = token_mask_from_frames(frame_mask, self.cfg.encoder.subsampling_factor, self.cfg.mask_threshold)
        loss = masked_token_loss(log_probs, tokens, token_mask)
        return NestOutput(log_probs, encoded_lens, tokens, frame_mask, token_mask, loss)

    @torch.no_grad()
    def encode(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, return_layers: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Unmasked encoder output for audio (B, S): (B, D, T'), lengths[, one (B, D, T') per layer]."""
        feats, lens = self.preprocessor(audio, audio_lens)
        return self.encoder(feats, lens, return_layers=return_layers)

    def set_num_updates(self, step: int) -> None:
        """The training step; nothing in NEST depends on it (the w2vbert objective's Gumbel temperature does)."""

    @torch.no_grad()
    def metrics(self, out: NestOutput) -> dict[str, torch.Tensor]:
        """Scalars for logging (computed on the device, no sync): masked accuracy, target perplexity."""
        T = min(out.log_probs.shape[1], out.tokens.shape[1])
        sel = out.token_mask[:, :T, None]
        sel = sel & (out.tokens[:, :T] >= 0)  # (B, T', N)
        correct = (out.log_probs[:, :T].argmax(2) == out.tokens[:, :T]) & sel
        valid = torch.arange(T, device=sel.device)[None] < out.encoded_lens[:, None]
        return {
            "masked_accuracy": correct.sum() / sel.sum().clamp(min=1),
            "target_perplexity": codebook_perplexity(out.tokens[:, :T], self.cfg.quantizer.num_classes, valid),
            "masked_fraction": out.frame_mask.float().mean(),
        }


def noam_lambda(d_model: int, warmup_steps: int, base_lr: float, min_lr: float):
    """Multiplier of ``base_lr`` at a step under NeMo's NoamAnnealing (for LambdaLR)."""

    def factor(step: int) -> float:
        step = max(1, step)
        mult = d_model**-0.5 * (min(step**-0.5, step * warmup_steps**-1.5) if warmup_steps > 0 else step**-0.5)
        if step > warmup_steps:
            mult = max(mult, min_lr / base_lr)
        return mult

    return factor


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, trainable and encoder-only parameter counts (as in NeMo's fixture param_counts.json)."""
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
    }

