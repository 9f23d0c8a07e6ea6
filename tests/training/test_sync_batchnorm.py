"""The synchronised BatchNorm on 2 gloo ranks equals one process's BatchNorm on the concatenated batch: output,
gradients, running statistics, with uneven and empty ranks, and no host sync."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nest.training.sync_batchnorm import SyncedBatchNorm, convert_batchnorm, revert_batchnorm
from nest.training.syncs import HostSyncCounter

C, T, STEPS = 3, 7, 3


def batches(sizes: tuple[int, ...], momentum):
    """Per step: the global input (mean far from 0, where a float32 sum of squares would cancel) and the
    gradient arriving at the output."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(sum(sizes), C, T, generator=g) * 0.5 + 40.0, torch.randn(sum(sizes), C, T, generator=g))
            for _ in range(STEPS)]


def layer(momentum) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(C, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


CASES = [((3, 2), 0.1), ((3, 2), None), ((4, 0), 0.1), ((4, 0), None)]  # (rows per rank, momentum)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = []
        for sizes, momentum in CASES:
            bn = convert_batchnorm(layer(momentum))
            assert isinstance(bn, SyncedBatchNorm)
            start = sum(sizes[:rank])
            steps = []
            for x, grad in batches(sizes, momentum):
                x = x[start:start + sizes[rank]].clone().requires_grad_(True)
                bn.zero_grad()
                with HostSyncCounter() as syncs:
                    y = bn(x)
                    y.backward(grad[start:start + sizes[rank]])
                steps.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(),
                              "db": bn.bias.grad.clone(), "syncs": syncs.count})
            plain = revert_batchnorm(bn)
            state = {k: v.clone() for k, v in plain.state_dict().items()}
            results.append({"steps": steps, "state": state, "reverted": type(plain).__name__})
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every case on 2 gloo ranks, in one spawn (starting processes is what costs)."""
    out = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_rank, args=(2, f"file://{out}/init", str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{'empty_rank' if 0 in s else 'uneven'}-momentum_{m}" for s, m in CASES])
def test_two_gloo_ranks_equal_one_batchnorm_on_the_whole_batch(case, ranks):
    sizes, momentum = CASES[case]
    ranks = [r[case] for r in ranks]
    ref = layer(momentum)
    for i, (x, grad) in enumerate(batches(sizes, momentum)):
        x = x.clone().requires_grad_(True)
        ref.zero_grad()
        y = ref(x)
        y.backward(grad)
        got = [r["steps"][i] for r in ranks]
        assert all(s["syncs"] == 0 for s in got)
        torch.testing.assert_close(torch.cat([s["y"] for s in got]), y.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.cat([s["dx"] for s in got]), x.grad, rtol=1e-4, atol=1e-4)
        # Each rank's parameter gradient is its share; DDP sums them (then divides by the world size).
        torch.testing.assert_close(got[0]["dw"] + got[1]["dw"], ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[0]["db"] + got[1]["db"], ref.bias.grad, rtol=1e-4, atol=1e-4)
    for r in ranks:
        assert r["reverted"] == "BatchNorm1d"
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_one_process_is_torch_batchnorm():
    ref, bn = layer(0.1), convert_batchnorm(layer(0.1))
    x = torch.randn(4, C, T)
    assert torch.equal(bn(x), ref(x))
    assert torch.equal(bn.running_var, ref.running_var)


def test_conversion_keeps_the_parameters_and_buffers():
    model = nn.Sequential(nn.Conv1d(C, C, 1), layer(0.1), nn.Sequential(nn.SyncBatchNorm(C)))
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    converted = convert_batchnorm(model)
    assert [type(m).__name__ for m in converted.modules()].count("SyncedBatchNorm") == 2
    assert {k: v.data_ptr() for k, v in converted.state_dict().items()} == tensors
    assert [id(p) for p in converted.parameters()] == params
    reverted = revert_batchnorm(converted)
    assert [type(m) for m in reverted.modules()][2::2] == [nn.BatchNorm1d, nn.BatchNorm1d]
    assert {k: v.data_ptr() for k, v in reverted.state_dict().items()} == tensors


def test_synced_layer_makes_no_cpu_tensor_on_fake_cuda_and_meta(monkeypatch):
    """Forward under CUDA bf16 autocast on fake CUDA tensors, forward and backward on the meta device (the
    autograd engine needs a real GPU for fake CUDA ones), the collectives stubbed as a world of 2 ranks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nest.training import sync_batchnorm
    from tests.training.test_gpu_fake_cuda import CpuTensors, cuda_bf16_autocast

    monkeypatch.setattr(sync_batchnorm.dist, "all_reduce", lambda t, group=None: t)
    monkeypatch.setattr(SyncedBatchNorm, "_world", lambda self: 2)
    bn, conv = convert_batchnorm(layer(0.1)), nn.Conv1d(C, C, 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        bn, conv = bn.to("cuda"), conv.to("cuda")
        x = torch.randn(4, C, T, device="cuda")
        with CpuTensors() as cpu, cuda_bf16_autocast():
            y = bn(conv(x))  # a bf16 input, as the conv modules give it
    assert cpu.ops == [] and y.dtype == torch.bfloat16 and y.device.type == "cuda"
    bn = convert_batchnorm(layer(0.1)).to("meta")
    x = torch.empty(4, C, T, device="meta", requires_grad=True)
    with CpuTensors() as cpu:
        bn(x).sum().backward()
    assert cpu.ops == [] and x.grad.device.type == "meta" and bn.weight.grad.device.type == "meta"
