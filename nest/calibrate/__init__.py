"""Per-bucket batch sizes that fill accelerator memory (OOMptimizer-style): ``prepare.py calibrate``.

For each bucket, from the longest down, binary-search the largest batch for which a full training step of the
configured model (clean + noisy audio at the bucket's upper duration, forward, backward, optimizer step,
configured precision, compiled when training compiles) stays within the memory budget. On a GPU the budget is a
fraction of the device's memory and the peak is CUDA's allocator peak (its reserved peak and allocation retries
are written beside it); on CPU the budget is given and the peak counts tensor bytes. Without the GPU,
``--estimate-gpu-gib N`` estimates each peak on fake tensors instead (nest.calibrate.estimate).

Headroom: the default budget is 90% of the GPU's memory, less an allowance for DDP's gradient buckets.
NeMo's OOMptimizer sizes have been seen to run out of memory after hours as the allocator fragments
(NVIDIA-NeMo/Speech #15847); training and calibration therefore run the CUDA allocator with expandable segments
(nest.training.allocator), which do not fragment into blocks too small for the next long batch, and training
retries a step that still runs out as two half batches (nest/training/step.py). Lower ``--memory-fraction`` for
more margin.

measure.py: one try (TrainingStep) and its MemoryPeak · search.py: the search over batch sizes and buckets ·
estimate.py: the estimate without a device · cli.py: the command and batch_sizes.yaml.
"""
from nest.calibrate.cli import add_parser, run_calibration, save_batch_sizes
from nest.calibrate.estimate import EstimatedStep, estimate_batch_sizes, largest_fitting
from nest.calibrate.measure import MemoryPeak, TensorPeak, TrainingStep, synthetic_batch, tensor_bytes
from nest.calibrate.search import (GIB, BucketResult, calibrate, does_not_fit, merge_equal_neighbours,
                                   search_batch_size)

__all__ = ["GIB", "BucketResult", "EstimatedStep", "MemoryPeak", "TensorPeak", "TrainingStep", "add_parser",
           "calibrate", "does_not_fit", "estimate_batch_sizes", "largest_fitting", "merge_equal_neighbours",
           "run_calibration", "save_batch_sizes", "search_batch_size", "synthetic_batch", "tensor_bytes"]
