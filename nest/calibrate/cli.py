"""``nest-prepare calibrate``: measured on the device at hand, or estimated for a GPU of a given size; batch_sizes.yaml."""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import yaml

from cuts.io import atomic_write
from nest.calibrate.estimate import EstimatedStep, estimate_batch_sizes
from nest.calibrate.measure import TrainingStep, tensor_bytes
from nest.calibrate.search import GIB, BucketResult, calibrate, merge_equal_neighbours
from nest.config.schema import OptimConfig
from nest.objectives.config import ModelConfig
from nest.training.allocator import use_training_allocator

log = logging.getLogger(__name__)


def save_batch_sizes(results: list[BucketResult], path, meta: dict) -> None:
    """batch_sizes.yaml: the (merged) bucket bounds and one batch size per bucket, for data.bucket_batch_size.

    The bounds are written exactly as measured (YAML keeps a float's every digit): training drops cuts longer than
    the last bound, so a bound rounded down would drop the corpus's longest cut."""
    doc = {
        "bucket_upper_duration": [float(r.upper) for r in results],
        "batch_sizes": [r.batch_size for r in results],
        "peak_gib": [round(r.peak.allocated / GIB, 3) for r in results],
        "reserved_gib": [round(r.peak.reserved / GIB, 3) for r in results],
        "alloc_retries": [r.peak.alloc_retries for r in results],
        **meta,
    }
    with atomic_write(path) as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def run_calibration(
    cfg: ModelConfig, uppers: list[float], out_path, *, memory_fraction: float = 0.9,
    memory_budget_gib: Optional[float] = None, precision: Optional[str] = None, gap: float = 0.05,
    ddp_allowance: bool = True, device: Optional[str] = None, optim: OptimConfig = OptimConfig(),
    estimate_gpu_gib: Optional[float] = None,
) -> list[BucketResult]:
    """``nest-prepare calibrate``: search, merge, write batch_sizes.yaml; returns the merged buckets.

    With ``estimate_gpu_gib`` nothing runs on a device: each bucket's peak is estimated on fake tensors
    (nest.calibrate.estimate) for a GPU of that many GiB, and the file says it is an estimate."""
    if estimate_gpu_gib is not None:
        precision = precision or "bf16"
        budget = int(estimate_gpu_gib * GIB * memory_fraction)
        # The eager model's memory: compiling needs the device (a compiled model usually needs less).
        step = EstimatedStep(dataclasses.replace(cfg, compile=False), precision, optim)
        where = {"device": f"estimate for a GPU of {estimate_gpu_gib:g} GiB (no device measured)", "estimate": True}
    else:
        conf = use_training_allocator()  # before the first CUDA allocation, as training does
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
        if dev.type == "cuda":
            total = torch.cuda.get_device_properties(dev).total_memory
            budget = int(total * memory_fraction) if memory_budget_gib is None else int(memory_budget_gib * GIB)
        elif memory_budget_gib is None:
            raise ValueError("on CPU give --memory-budget-gib (there is no device memory to take a fraction of)")
        else:
            budget = int(memory_budget_gib * GIB)
        step = TrainingStep(cfg, dev, precision, optim=optim)
        where = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "compiled": cfg.compile}
        if dev.type == "cuda":
            where["allocator"] = conf
    allowance = tensor_bytes(p for p in step.model.parameters() if p.requires_grad) if ddp_allowance else 0
    log.info("budget %.2f GiB, DDP gradient-bucket allowance %.2f GiB", budget / GIB, allowance / GIB)
    if estimate_gpu_gib is not None:
        results = merge_equal_neighbours(estimate_batch_sizes(step, uppers, budget - allowance))
    else:
        results = merge_equal_neighbours(calibrate(step, uppers, budget - allowance, gap,
                                                   check_device=step.check_device))
    save_batch_sizes(results, out_path, {
        **where, "precision": precision, "budget_gib": round(budget / GIB, 3),
        "ddp_allowance_gib": round(allowance / GIB, 3), "gap": gap,
    })
    return results


def add_parser(subparsers) -> None:
    """Register ``calibrate`` on prepare.py's subcommands."""
    p = subparsers.add_parser("calibrate", help="per-bucket batch sizes that fill accelerator memory")
    p.add_argument("--config", required=True, help="training config (its model section is measured)")
    p.add_argument("--bins", required=True, help="bins.yaml from `nest-prepare bins`")
    p.add_argument("--out", required=True, help="batch_sizes.yaml to write (data.bucket_batch_size)")
    p.add_argument("--memory-fraction", type=float, default=0.9, help="of the GPU's memory")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="an absolute budget (needed on CPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on GPU")
    p.add_argument("--gap", type=float, default=0.05, help="stop when the search bracket is this tight (relative)")
    p.add_argument("--no-ddp-allowance", action="store_true", help="single device: keep no room for DDP buckets")
    p.add_argument("--device", default=None)
    p.add_argument("--estimate-gpu-gib", type=float, default=None, metavar="N",
                   help="no device: estimate the sizes for a GPU of N GiB (fake tensors; marked as an estimate)")
    p.add_argument("overrides", nargs="*", help="config key=value")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> dict:
    from cuts.bins import Bins
    from nest.config.load import load_config

    cfg = load_config(args.config, args.overrides)
    results = run_calibration(
        cfg.model, Bins.load(args.bins).upper, args.out, memory_fraction=args.memory_fraction,
        memory_budget_gib=args.memory_budget_gib, precision=args.precision, gap=args.gap,
        ddp_allowance=not args.no_ddp_allowance, device=args.device, optim=cfg.optim,
        estimate_gpu_gib=args.estimate_gpu_gib,
    )
    return {"out": args.out, "estimate": args.estimate_gpu_gib is not None,
            "buckets": [{"upper_s": r.upper, "batch_size": r.batch_size, "peak_gib": round(r.peak.allocated / GIB, 3),
                         "reserved_gib": round(r.peak.reserved / GIB, 3), "alloc_retries": r.peak.alloc_retries}
                        for r in results]}
