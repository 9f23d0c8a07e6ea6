"""FastConformer encoder, numerically as NeMo's ConformerEncoder (dw_striding, rel_pos, untied biases).

Module and parameter names follow NeMo's so that NeMo state dicts load without renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from nest.model.features import lengths_to_mask

NEG_INF = -10000.0  # NeMo's masking value for attention scores


@dataclass
class EncoderConfig:
    """FastConformer encoder."""

    n_layers: int = 17  # Conformer blocks
    d_model: int = 512  # model width
    n_heads: int = 8  # attention heads
    subsampling_factor: int = 8  # frames per encoder step (8: 80 ms)
    subsampling_conv_channels: int = 256  # channels of the subsampling convolutions
    subsampling_conv_chunking_factor: int = 1  # 1: split the batch only past 2^31 conv elements; 2^k: always; -1: never
    ff_expansion_factor: int = 4  # feed-forward width / d_model
    conv_kernel_size: int = 9  # depthwise convolution kernel (odd)
    conv_norm_type: str = "batch_norm"  # batch_norm | layer_norm
    xscaling: bool = True  # scale the input of the blocks by sqrt(d_model)
    untie_biases: bool = True  # per-layer positional biases (NeMo's default)
    use_bias: bool = True  # biases in linear and convolution layers
    dropout: float = 0.1  # dropout in the blocks
    dropout_pre_encoder: float = 0.1  # dropout after the positional encoding
    dropout_emb: float = 0.0  # dropout of the positional embeddings
    dropout_att: float = 0.1  # dropout of attention weights
    stochastic_depth_drop_prob: float = 0.0  # largest probability of skipping a block
    stochastic_depth_mode: str = "linear"  # linear | uniform
    stochastic_depth_start_layer: int = 1  # blocks before this one are never skipped


# The size table atop NeMo's nest_fast-conformer.yaml.
ENCODER_PRESETS = {
    "small": dict(d_model=176, n_heads=4, n_layers=16, conv_kernel_size=9, xscaling=True, use_bias=True),
    "medium": dict(d_model=256, n_heads=4, n_layers=16, conv_kernel_size=9, xscaling=True, use_bias=True),
    "large": dict(d_model=512, n_heads=8, n_layers=17, conv_kernel_size=9, xscaling=True, use_bias=True),
    "xlarge": dict(d_model=1024, n_heads=8, n_layers=24, conv_kernel_size=9, xscaling=False, use_bias=False),
    "xxlarge": dict(d_model=1024, n_heads=8, n_layers=42, conv_kernel_size=5, xscaling=False, use_bias=False),
}


class ConvSubsampling(nn.Module):
    """dw_striding subsampling: (B, T, feat_in) -> (B, T / factor, d_model).

    A full conv then (depthwise, pointwise) pairs, each stride 2, with padded frames zeroed before
    every layer as NeMo's MaskedConvSequential does.

    The first conv's output, (B, channels, T/2, feat_in/2), is the largest tensor of the model and
    passes 2^31 elements at about 4,200 s of audio per batch (channels=256), where convolution
    kernels index with 32 bits (pytorch#80020). As NeMo's ``subsampling_conv_chunking_factor``:
    1 runs the batch in chunks of utterances only when that output would pass ``chunk_elements``;
    a power of 2 always splits the batch into that many chunks; -1 never splits. Decided from
    shapes alone, so it costs no host-device synchronisation. The chunks come from ``tensor_split``
    into a number of chunks that does not depend on the batch size (1, or the power of 2), so that
    under torch.compile with a dynamic batch dimension the split adds no guard on the batch size;
    the only guard is the 2^31 test itself, which every batch below the limit passes.
    """

    chunk_elements = 2**31  # a class attribute so that tests can force chunking on small inputs

    def __init__(self, feat_in: int, d_model: int, channels: int, factor: int, chunking_factor: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(int(math.log2(factor)) - 1):
            layers += [
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, 1),
                nn.ReLU(),
            ]
        self.conv = nn.Sequential(*layers)
        self.channels = channels
        self.chunking_factor = chunking_factor
        freq = feat_in
        for _ in range(int(math.log2(factor))):
            freq = (freq - 1) // 2 + 1
        self.out = nn.Linear(channels * freq, d_model)

    def num_chunks(self, batch: int, frames: int, feat_in: int) -> int:
        """How many chunks of utterances a (batch, frames, feat_in) input is run in; 1: no split."""
        if self.chunking_factor == -1:
            return 1
        if self.chunking_factor > 1:
            return self.chunking_factor
        per_utterance = self.channels * ((frames - 1) // 2 + 1) * ((feat_in - 1) // 2 + 1)
        if batch * per_utterance <= self.chunk_elements:
            return 1
        # One utterance past the limit alone (over an hour of audio) cannot be split by utterance.
        per_chunk = max(1, self.chunk_elements // per_utterance)
        return -(-batch // per_chunk)

    def _conv(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x[:, None]  # (B, 1, T, F)
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d):
                x = x * lengths_to_mask(lens, x.shape[2])[:, None, :, None].to(x.dtype)
                x = layer(x)
                if layer.stride[0] > 1:
                    lens = torch.div(lens - 1, 2, rounding_mode="floor") + 1
            else:
                x = layer(x)
        x = x * lengths_to_mask(lens, x.shape[2])[:, None, :, None].to(x.dtype)
        return x, lens  # (B, C, T', F')

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = self.num_chunks(*x.shape)
        if chunks == 1:
            x, lens = self._conv(x, lens)
        else:  # chunks of equal size (to within one utterance); empty ones when the batch is smaller
            parts = [self._conv(xc, lc) for xc, lc in zip(x.tensor_split(chunks), lens.tensor_split(chunks))]
            x, lens = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lens


class RelPositionalEncoding(nn.Module):
    """Scales the input and returns sinusoidal embeddings of relative positions T-1 .. -(T-1)."""

    def __init__(self, d_model: int, dropout: float, dropout_emb: float, xscale: Optional[float]):
        super().__init__()
        self.d_model = d_model
        self.xscale = xscale
        self.dropout = nn.Dropout(dropout)
        self.dropout_emb = nn.Dropout(dropout_emb) if dropout_emb > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = x.shape[1]
        if self.xscale:
            x = x * self.xscale
        positions = torch.arange(T - 1, -T, -1, dtype=torch.float32, device=x.device)[:, None]
        div = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device=x.device) * -(math.log(10000.0) / self.d_model)
        )
        pe = torch.zeros(2 * T - 1, self.d_model, device=x.device)
        pe[:, 0::2] = torch.sin(positions * div)
        pe[:, 1::2] = torch.cos(positions * div)
        pe = pe[None].to(x.dtype)  # (1, 2T-1, D)
        if self.dropout_emb is not None:
            pe = self.dropout_emb(pe)
        return self.dropout(x), pe


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL attention with untied per-layer biases, through PyTorch's fused SDPA."""

    def __init__(self, n_heads: int, d_model: int, dropout: float, use_bias: bool):
        super().__init__()
        self.h, self.d_k = n_heads, d_model // n_heads
        self.dropout_rate = dropout
        self.linear_q = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, 2T-1) scores per relative position -> scores per key position (first T columns)."""
        b, h, t, p = x.shape
        x = F.pad(x, (1, 0)).view(b, h, p + 1, t)
        return x[:, :, 1:].reshape(b, h, t, p)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, att_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), pos_emb (1, 2T-1, D), att_mask (B, T, T) True where attention is not allowed."""
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2T-1, d_k)
        q_u = (q + self.pos_bias_u.to(q.dtype)).transpose(1, 2)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v.to(q.dtype)).transpose(1, 2)
        bd = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))[..., :T] / math.sqrt(self.d_k)
        bd = bd.masked_fill(att_mask[:, None], NEG_INF)
        out = F.scaled_dot_product_attention(
            q_u, k, v, attn_mask=bd, dropout_p=self.dropout_rate if self.training else 0.0
        )  # (B, H, T, d_k)
        # Rows with every key masked (padded queries) give zeros, as NeMo's masked softmax does.
        out = out.masked_fill(att_mask.all(-1)[:, None, :, None], 0.0)
        return self.linear_out(out.transpose(1, 2).reshape(B, T, self.h * self.d_k))


class ConformerFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, use_bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.silu(self.linear1(x))))


class ConformerConvolution(nn.Module):
    def __init__(self, d_model: int, kernel_size: int, norm_type: str, use_bias: bool):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=use_bias)
        self.depthwise_conv = nn.Conv1d(
            d_model, d_model, kernel_size, padding=(kernel_size - 1) // 2, groups=d_model, bias=use_bias
        )
        self.norm_type = norm_type
        self.batch_norm = nn.BatchNorm1d(d_model) if norm_type == "batch_norm" else nn.LayerNorm(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=use_bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), pad_mask (B, T) True on padding."""
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)  # (B, D, T)
        x = self.depthwise_conv(x.masked_fill(pad_mask[:, None, :], 0.0))
        if self.norm_type == "layer_norm":
            x = self.batch_norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.batch_norm(x)
        return self.pointwise_conv2(F.silu(x)).transpose(1, 2)


class ConformerLayer(nn.Module):
    """Macaron block: half FF, self-attention, convolution, half FF, layer norm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, d_ff = cfg.d_model, cfg.d_model * cfg.ff_expansion_factor
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = ConformerFeedForward(d, d_ff, cfg.dropout, cfg.use_bias)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConformerConvolution(d, cfg.conv_kernel_size, cfg.conv_norm_type, cfg.use_bias)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionMultiHeadAttention(cfg.n_heads, d, cfg.dropout_att, cfg.use_bias)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = ConformerFeedForward(d, d_ff, cfg.dropout, cfg.use_bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x, pos_emb, att_mask, pad_mask):
        x = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        x = x + self.dropout(self.self_attn(self.norm_self_att(x), pos_emb, att_mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), pad_mask))
        x = x + 0.5 * self.dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x)


def stochastic_depth_probs(cfg: EncoderConfig) -> list[float]:
    """Per-layer drop probabilities (NeMo's compute_stochastic_depth_drop_probs)."""
    n, start, p = cfg.n_layers, cfg.stochastic_depth_start_layer, cfg.stochastic_depth_drop_prob
    rest = n - start
    if cfg.stochastic_depth_mode == "linear":
        return [0.0] * start + [i / rest * p for i in range(1, rest + 1)]
    return [0.0] * start + [p] * rest


class ConformerEncoder(nn.Module):
    """Features (B, feat_in, T) and lengths -> encoded (B, d_model, T / factor) and lengths."""

    def __init__(self, cfg: EncoderConfig, feat_in: int):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(
            feat_in, cfg.d_model, cfg.subsampling_conv_channels, cfg.subsampling_factor,
            cfg.subsampling_conv_chunking_factor,
        )
        xscale = math.sqrt(cfg.d_model) if cfg.xscaling else None
        self.pos_enc = RelPositionalEncoding(cfg.d_model, cfg.dropout_pre_encoder, cfg.dropout_emb, xscale)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))
        self.layer_drop_probs = stochastic_depth_probs(cfg)

    def forward(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, return_layers: bool = False,
        bypass_pre_encode: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Features (B, feat_in, T) -> (B, D, T'), lengths[, one (B, D, T') per layer].

        With ``bypass_pre_encode``, ``feats`` is already subsampled, (B, T', D) (NeMo's argument of
        that name; post-convolution masking masks there).
        """
        if bypass_pre_encode:
            x, lens = feats, feat_lens
        else:
            x, lens = self.pre_encode(feats.transpose(1, 2), feat_lens)  # (B, T', D)
        x, pos_emb = self.pos_enc(x)
        valid = lengths_to_mask(lens, x.shape[1])  # (B, T')
        att_mask = ~(valid[:, :, None] & valid[:, None, :])  # (B, T', T')
        pad_mask = ~valid
        hidden = []
        for drop_prob, layer in zip(self.layer_drop_probs, self.layers):
            residual = x
            x = layer(x, pos_emb, att_mask, pad_mask)
            if self.training and drop_prob > 0.0:
                # NeMo's stochastic depth, decided on the device (no .item()): a dropped layer adds
                # 0 * its output (every parameter stays in the graph for DDP), a kept one is rescaled.
                keep = (torch.rand(1, device=x.device) >= drop_prob).to(x.dtype)
                x = (x - residual) * keep / (1.0 - drop_prob) + residual
            if return_layers:
                hidden.append(x.transpose(1, 2))
        out = x.transpose(1, 2)
        return (out, lens, hidden) if return_layers else (out, lens)
