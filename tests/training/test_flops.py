"""FLOP counts of a training step: torch's counter with the grouped-convolution weight gradient corrected."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from nest.objectives import model_preset
from nest.objectives.nest import NestModel
from nest.training.flops import counted_flops


def conv_step(conv: torch.nn.Conv1d, x: torch.Tensor) -> None:
    conv(x.requires_grad_()).sum().backward()


def test_depthwise_backward_counts_each_gradient_once():
    B, D, T, K = 3, 64, 50, 9
    conv = torch.nn.Conv1d(D, D, K, padding=K // 2, groups=D, bias=False)
    x = torch.randn(B, D, T)
    forward = 2 * B * D * T * K  # one multiply-add per output element and tap
    assert counted_flops(lambda: conv_step(conv, x)) == 3 * forward  # forward, input and weight gradients
    with FlopCounterMode(display=False) as torch_counter:
        conv_step(conv, x)
    assert torch_counter.get_total_flops() == 2 * forward + D * forward  # torch's: the weight gradient x groups


def test_dense_convolutions_and_matmuls_count_as_torch_does():
    conv, lin = torch.nn.Conv2d(4, 8, 3, stride=2), torch.nn.Linear(16, 32)
    x, y = torch.randn(2, 4, 20, 20), torch.randn(5, 16)

    def run():
        conv(x).sum().backward()
        lin(y).sum().backward()

    with FlopCounterMode(display=False) as torch_counter:
        run()
    assert counted_flops(run) == torch_counter.get_total_flops() > 0


def test_nest_large_on_the_meta_device():
    """NEST-L, forward and backward of 10 s utterances, counted without memory: about 9 GFLOP per audio-second."""
    with torch.device("meta"):
        model = NestModel(model_preset("large")).train()
        audio = torch.randn(2, 160_000)
    lens = torch.full((2,), 160_000, device="meta")
    flops = counted_flops(lambda: model(audio, lens, audio, lens).loss.backward())
    assert 8.0e9 < flops / 20.0 < 10.0e9
