"""FLOPs of a training step, counted by torch.utils.flop_counter with its grouped-convolution error corrected.

torch 2.11's formula for ``convolution_backward`` counts the weight gradient of a grouped convolution as if the
convolution were dense: ``groups`` times too many (pytorch/torch/utils/flop_counter.py, conv_backward_flop, which
takes ``_groups`` and ignores it). The Conformer's depthwise convolution (groups = d_model: 512 for NEST-L) and the
subsampling's depthwise convolutions (groups = its channels) would dominate the count. The forward formula is
right (the weight's shape already holds in_channels / groups), and so is the input gradient.

Counted on any device, the meta device included (shapes are all it reads), so presets too large for the machine
can be counted without memory.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``convolution_backward``: torch's formula, with the weight gradient divided by ``groups``."""
    t = lambda s: [s[1], s[0], *s[2:]]  # noqa: E731  (batch and channel dimensions swapped)
    flops = 0
    if output_mask[0]:  # the input gradient: a transposed convolution of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # the weight gradient: a convolution of the input with grad_out, batch as channels
        w_grad = t(out_shape[1])
        dense = (conv_flop_count(t(grad_out_shape), t(x_shape), w_grad) if transposed
                 else conv_flop_count(t(x_shape), t(grad_out_shape), w_grad))
        flops += dense // groups
    return flops


def counted_flops(run: Callable[[], object]) -> int:
    """Floating-point operations (multiply-adds count 2) of ``run()``: forward, backward and whatever else it does."""
    counter = FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: grouped_conv_backward_flop})
    with counter:
        run()
    return counter.get_total_flops()
