"""GPU correctness on a CPU-only machine: every objective runs its forward pass, loss, metrics and the guarded
training step on fake CUDA tensors under CUDA bf16 autocast, and no tensor is created on the CPU on the way
(on a GPU each would be a host tensor in device code: a copy and a wait, or an error).

The backward pass itself cannot run on fake CUDA tensors without a GPU (torch 2.11's autograd engine asks the
CUDA driver for the device's context): here the guard's backward stands in by giving every trainable parameter a
gradient, and tests/training/test_gpu_meta.py runs the real backward pass on the meta device."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cuts.dataset import AudioNoiseBatch
from nest.config import load_config
from nest.config.schema import OptimConfig
from nest.model.conformer import ConvSubsampling
from nest.model.quantizer import RandomProjectionQuantizer
from nest.objectives import build_model
from nest.training.optim import make_optimizer
from nest.training.step import GuardedStep, StepOptions, forward_batch
from tests.conftest import ROOT

CASES = {  # name: (config, overrides)
    "nest_pre_conv": ("nest_tiny.yaml", []),
    "nest_post_conv": ("nest_tiny.yaml", ["model.mask_position=post_conv"]),
    "nest_kmeans_pre_conv": ("nest_tiny.yaml", ["model.targets=kmeans"]),
    "nest_kmeans_post_conv": ("nest_tiny.yaml", ["model.targets=kmeans", "model.mask_position=post_conv"]),
    "w2vbert": ("w2vbert_tiny.yaml", []),
}


class CpuTensors(TorchDispatchMode):
    """Records every op whose output holds a tensor on the CPU, and the dtypes matrix products run in."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.matmul_dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves(out)):
            self.ops.append(str(func))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.matmul_dtypes.add(out.dtype)
        return out


@contextlib.contextmanager
def cuda_bf16_autocast():
    """What Lightning's bf16-mixed does around the step, for CUDA, whatever device the tensors are really on."""
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)


def fake_cuda_step(case: str, plant=None) -> tuple[list[str], dict]:
    """Build the case's model for real, move it to fake CUDA, run forward, loss, metrics and two guarded steps
    (the second closes an accumulation window: the optimizer step) under CUDA bf16 autocast. Returns the ops
    that made CPU tensors and what the steps gave."""
    config, overrides = CASES[case]
    cfg = load_config(ROOT / "configs" / config, overrides).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        opt, sched = make_optimizer(model, OptimConfig(), cfg.encoder.d_model)
        params = [p for p in model.parameters() if p.requires_grad]

        def backward(loss: torch.Tensor) -> None:  # what autograd leaves: a gradient beside each parameter
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad + loss.detach().float()

        guard = GuardedStep(model, opt, sched, StepOptions(accumulate_grad_batches=2, gradient_clip_val=1.0),
                            backward=backward)
        B, S = 3, 24000
        lens = torch.full((B,), S, dtype=torch.long, device="cuda")
        audio = torch.randn(B, S, device="cuda")
        targets = None
        if cfg.targets == "kmeans":
            frames = S // 160 // cfg.encoder.subsampling_factor
            targets = torch.randint(0, cfg.quantizer.num_classes, (B, frames, cfg.quantizer.num_books), device="cuda")
        batch = AudioNoiseBatch(audio=audio, audio_lens=lens, noise=0.1 * torch.randn_like(audio), targets=targets,
                                cut_ids=[f"c{i}" for i in range(B)])
        with CpuTensors() as cpu, cuda_bf16_autocast():
            if plant:
                plant()
            out = forward_batch(model, batch)
            metrics = model.metrics(out)
            steps = [guard(batch, lambda b: forward_batch(model, b)) for _ in range(2)]
        result = {"loss": out.loss, "metrics": metrics, "steps": steps, "matmul_dtypes": cpu.matmul_dtypes}
    return cpu.ops, result


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_objective_runs_on_fake_cuda_without_a_cpu_tensor(case):
    ops, result = fake_cuda_step(case)
    assert ops == [], ops
    assert result["loss"].device.type == "cuda" and result["loss"].dtype == torch.float32
    assert torch.bfloat16 in result["matmul_dtypes"]  # CUDA autocast applies to the fake tensors
    assert all(v.device.type == "cuda" and v.ndim == 0 for v in result["metrics"].values())
    assert [s.window_end for s in result["steps"]] == [False, True] and result["steps"][1].finite.device.type == "cuda"


def test_the_check_catches_a_cpu_tensor(monkeypatch):
    """A scalar made with torch.tensor (on the CPU by default) inside the loss."""
    from nest.objectives import nest

    loss = nest.masked_token_loss
    monkeypatch.setattr(nest, "masked_token_loss", lambda *a: loss(*a) * torch.tensor(1.0))
    ops, _ = fake_cuda_step("nest_pre_conv")
    assert ops and all("lift_fresh" in op or "_to_copy" in op or "scalar_tensor" in op for op in ops), ops


def test_targets_are_computed_in_float32_without_tf32_under_autocast(monkeypatch):
    """Both mask positions: the quantizer (and, post_conv, the clean subsampling) run with autocast off and TF32
    off, even where the user enabled TF32; the noisy subsampling keeps the training precision."""
    seen = []
    nearest, subsample = RandomProjectionQuantizer._nearest, ConvSubsampling.forward

    def record(kind):
        seen.append((kind, torch.is_autocast_enabled("cuda"), torch.backends.cuda.matmul.fp32_precision,
                     torch.backends.cudnn.conv.fp32_precision))

    monkeypatch.setattr(RandomProjectionQuantizer, "_nearest", lambda *a: record("quantizer") or nearest(*a))
    monkeypatch.setattr(ConvSubsampling, "forward", lambda *a: record("subsampling") or subsample(*a))
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        for case in ("nest_pre_conv", "nest_post_conv"):
            seen.clear()
            fake_cuda_step(case)
            quantizer = [s[1:] for s in seen if s[0] == "quantizer"]
            assert len(quantizer) == 3 and set(quantizer) == {(False, "ieee", "ieee")}  # 3 forward passes
            subsampling = [s[1:] for s in seen if s[0] == "subsampling"]
            if case == "nest_post_conv":  # the clean subsampling, then the noisy one, in each forward
                assert subsampling == [(False, "ieee", "ieee"), (True, "tf32", "tf32")] * 3, subsampling
            else:
                assert subsampling == [(True, "tf32", "tf32")] * 3, subsampling
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32",) * 2
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
