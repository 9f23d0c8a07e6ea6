"""GPU correctness on a CPU-only machine, on the meta device (shapes and dtypes, no data): NEST-L's forward and
backward passes run without a tensor on the CPU, as does the backward pass of every objective (which fake CUDA
tensors cannot run without a GPU, tests/training/test_gpu_fake_cuda.py)."""
import pytest
import torch

from nest.config import load_config
from nest.objectives import build_model
from nest.objectives.config import model_preset
from tests.conftest import ROOT
from tests.training.test_gpu_fake_cuda import CASES, CpuTensors


def forward_backward(model, B: int, seconds: float, targets: bool = False) -> tuple[list[str], torch.Tensor]:
    S = int(seconds * model.cfg.preprocessor.sample_rate)
    lens = torch.full((B,), S, dtype=torch.long, device="meta")
    audio = torch.empty(B, S, device="meta")
    extra = {}
    if targets:
        q = model.cfg.quantizer
        extra["targets"] = torch.empty(B, S // 160 // model.cfg.encoder.subsampling_factor, q.num_books,
                                       dtype=torch.long, device="meta")
    with CpuTensors() as cpu:
        out = model(audio, lens, audio, lens, **extra)
        out.loss.backward()
        model.metrics(out)
    return cpu.ops, out.loss


@pytest.mark.parametrize("mask_position", ["pre_conv", "post_conv"])
def test_nest_l_forward_and_backward_on_the_meta_device(mask_position):
    cfg = model_preset("large")
    cfg.mask_position = mask_position
    with torch.device("meta"):
        model = build_model(cfg).train()
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    ops, loss = forward_backward(model, B=16, seconds=20.0)
    assert ops == [] and loss.device.type == "meta" and loss.shape == ()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in trainable)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_objective_backward_on_the_meta_device(case):
    config, overrides = CASES[case]
    cfg = load_config(ROOT / "configs" / config, overrides).model
    with torch.device("meta"):
        model = build_model(cfg).train()
    ops, _ = forward_backward(model, B=3, seconds=1.5, targets=cfg.targets == "kmeans")
    assert ops == [], ops
