"""The guarded step in plain torch (as calibration runs it): accumulation, clipping, skips, out-of-memory."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cuts.dataset import AudioNoiseBatch
from nest.training.optim import noam_lambda
from nest.training.step import GuardedStep, StepOptions


class Toy(nn.Module):
    """audio (B, S) -> an output with ``.loss``; a BatchNorm so that its statistics are guarded too."""

    cfg = SimpleNamespace(preprocessor=SimpleNamespace(sample_rate=8))  # read by the step's messages

    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, batch):
        x = self.lin(batch.audio)
        return SimpleNamespace(loss=x.pow(2).mean() + self.norm(x).mean())


def batch(scale=1.0, n=4):
    return AudioNoiseBatch(audio=scale * torch.randn(n, 8), audio_lens=torch.full((n,), 8),
                           cut_ids=[str(i) for i in range(n)])


def guarded(model, **options):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, noam_lambda(8, 0, 1.0, 0.0))
    steps = []
    step = GuardedStep(model, opt, sched, StepOptions(**options), optimizer_step=lambda: steps.append(
        torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()) or opt.step())
    return step, steps


def test_accumulation_steps_once_per_window_and_clipping_bounds_the_norm():
    torch.manual_seed(0)
    model = Toy()
    step, norms = guarded(model, accumulate_grad_batches=3, gradient_clip_val=0.01)
    ends = [step(batch(scale=100.0), model).window_end for _ in range(6)]
    assert ends == [False, False, True, False, False, True] and len(norms) == 2
    assert all(n <= 0.01 + 1e-6 for n in norms)


def test_a_non_finite_loss_leaves_weights_and_statistics_alone():
    torch.manual_seed(0)
    model = Toy()
    step, _ = guarded(model)
    step(batch(), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = step(batch(scale=float("nan")), model)
    assert not done.finite and int(step.skipped) == 1 and int(step.consecutive) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if "num_batches" not in k)


def test_out_of_memory_is_retried_in_halves_unless_told_not_to():
    torch.manual_seed(0)
    model = Toy()
    calls = []

    def tight(b):
        calls.append(b.audio.shape[0])
        if b.audio.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return model(b)

    step, _ = guarded(model)
    assert step(batch(), tight).oom_retries == 1 and calls == [4, 2, 2]
    step.retry_oom = False
    with pytest.raises(torch.OutOfMemoryError):
        step(batch(), tight)
