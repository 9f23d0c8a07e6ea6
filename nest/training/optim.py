"""The optimizer and learning-rate schedule of a run: fused AdamW with NeMo's Noam annealing."""
from __future__ import annotations

import torch

from nest.config.schema import OptimConfig


def noam_lambda(d_model: int, warmup_steps: int, base_lr: float, min_lr: float):
    """Multiplier of ``base_lr`` at a step under NeMo's NoamAnnealing (for LambdaLR)."""

    def factor(step: int) -> float:
        step = max(1, step)
        mult = d_model**-0.5 * (min(step**-0.5, step * warmup_steps**-1.5) if warmup_steps > 0 else step**-0.5)
        if step > warmup_steps:
            mult = max(mult, min_lr / base_lr)
        return mult

    return factor


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, d_model: int):
    """(optimizer, scheduler) over the trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused: one kernel per step, and the only AdamW that takes found_inf (a skip decided on the device).
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, noam_lambda(d_model, cfg.warmup_steps, cfg.lr, cfg.min_lr))
