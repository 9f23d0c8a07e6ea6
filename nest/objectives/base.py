"""What every objective shares: the mel front end and the FastConformer encoder, and the unmasked encoding."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from nest.model.conformer import ConformerEncoder
from nest.model.features import MelFeatures
from nest.objectives.config import ModelConfig


class EncoderModel(nn.Module):
    """Preprocessor + encoder, with the modules of an objective around them.

    Modules are built in this order: ``preprocessor``, the objective's ``build_targets()`` (what makes its
    targets and masks), ``encoder``, its ``build_heads()``; the order fixes which random draws initialise
    which weights, so a seed gives the same model as before. The state-dict names (``preprocessor.*``,
    ``encoder.*``) are NeMo's.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.preprocessor = MelFeatures(cfg.preprocessor)
        self.build_targets()
        self.encoder = ConformerEncoder(cfg.encoder, cfg.preprocessor.features)
        self.build_heads()

    def build_targets(self) -> None:
        """Modules built before the encoder."""

    def build_heads(self) -> None:
        """Modules built after the encoder."""

    def compile_encoder(self, **kwargs) -> None:
        """Compile the encoder's forward with torch.compile (``model.compile``); state dict keys are kept.

        Batch and time are marked dynamic on every call (``mark_dynamic_dims``), so that the first graph
        already serves every bucket's shape: torch's default compiles a static graph first, then one per
        dimension it sees change, and ``dynamic=False`` compiles one per shape until it reaches the
        recompile limit and runs eagerly. A batch of one utterance still gets a graph of its own (torch
        specialises sizes 0 and 1). ``kwargs`` go to torch.compile.
        """
        self.encoder.forward = torch.compile(self.encoder.forward, **kwargs)
        self.encoder.register_forward_pre_hook(mark_dynamic_dims, with_kwargs=True)

    def set_num_updates(self, step: int) -> None:
        """The training step, for objectives whose schedule depends on it (nothing here)."""

    # The metrics measured over the masked frames: a batch with nothing masked has no value for them (they read 0).
    masked_metrics: frozenset[str] = frozenset()

    def metrics(self, out) -> dict[str, torch.Tensor]:
        """Scalar tensors of one forward pass for logging steps, computed on the device."""
        raise NotImplementedError

    def has_loss(self, out) -> torch.Tensor:
        """() bool on the device: whether ``out.loss`` has a term at all. A batch with nothing masked has none: its
        loss of 0 measures nothing and stays out of the logged mean."""
        return torch.ones((), dtype=torch.bool, device=out.loss.device)

    @torch.no_grad()
    def encode(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, return_layers: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Unmasked encoder output for audio (B, S): (B, D, T'), lengths[, one (B, D, T') per layer]."""
        feats, lens = self.preprocessor(audio, audio_lens)
        return self.encoder(feats, lens, return_layers=return_layers)


def mark_dynamic_dims(encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a compiled encoder, run before its compiled forward: batch and time of the inputs are
    dynamic. Features are (B, feat_in, T), or (B, T', D) with ``bypass_pre_encode``."""
    given = inspect.signature(type(encoder).forward).bind(encoder, *args, **kwargs).arguments
    feats = given["feats"]
    torch._dynamo.mark_dynamic(feats, 0)
    torch._dynamo.mark_dynamic(feats, 1 if given.get("bypass_pre_encode") else 2)
    torch._dynamo.mark_dynamic(given["feat_lens"], 0)


def select_layers(spec: str, n_layers: int) -> list[int]:
    """Encoder layers named by ``spec``: ``all`` or comma-separated indices from 0 (the first Conformer block's
    output; negative from the end), as ``encode(return_layers=True)`` lists them; sorted, without repeats."""
    if spec == "all":
        return list(range(n_layers))
    layers = [int(x) for x in spec.split(",")]
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range for a {n_layers}-layer encoder")
    return sorted({i % n_layers for i in layers})


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, trainable and encoder-only parameter counts (as in NeMo's fixture param_counts.json)."""
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
    }
