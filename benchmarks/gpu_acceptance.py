"""One-shot GPU acceptance: NEST-L on one GPU in at most 8 minutes, on synthetic audio, no network.

  python benchmarks/gpu_acceptance.py --out gpu_acceptance/          # on the GPU machine (README: GPU acceptance)
  python benchmarks/gpu_acceptance.py --dry-run --out /tmp/acc       # every phase on CPU, tiny model, < 2 minutes

Phases, in this order, each capped in time (a phase that reaches its cap reports what it has, "timed_out": true):
env (versions, device, a large bf16 matrix product's TFLOP/s), calibrate (NEST-L's batch sizes for 6 buckets, as
``prepare.py calibrate``), eager (bf16 guarded training steps per bucket: step time, audio-s/s, MFU, allocated and
reserved memory against the budget, allocation retries), mixed (the buckets in random order, as the sampler mixes
them), syncs (host synchronisations of a step: HostSyncCounter, torch.cuda.set_sync_debug_mode warnings, profiler
counts of cudaStreamSynchronize / cudaMemcpy, the SDPA kernels chosen), compile (the encoder compiled as
model.compile does, batch and time dynamic: compile seconds, graphs, recompiles, and the eager phases' figures).
Every result is a JSON line with a ``phase`` field, on stdout and in OUT/results.jsonl; OUT also gets
batch_sizes.yaml and the profiler's table. The exit code is 1 when a phase failed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import random
import signal
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

from model_step import matmul_tflops, synchronize, timed  # noqa: E402  (benchmarks/, the folder of this script)
from cuts.console import error_line  # noqa: E402
from nest.calibrate import GIB, TrainingStep, calibrate, merge_equal_neighbours, save_batch_sizes  # noqa: E402
from nest.calibrate.measure import synthetic_batch, tensor_bytes  # noqa: E402
from nest.config.load import load_config  # noqa: E402
from nest.objectives import model_preset  # noqa: E402
from nest.training.allocator import use_training_allocator  # noqa: E402
from nest.training.flops import counted_flops  # noqa: E402
from nest.training.syncs import HostSyncCounter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 peaks (TFLOP/s, without sparsity) for MFU; --peak-tflops for other devices.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass
class Plan:
    """What a run does: the GPU run, or the dry run's tiny CPU version of every phase."""

    preset: str
    uppers: list[float]
    precision: str
    gap: float
    warmup: int
    steps: int
    caps: dict[str, float]  # phase -> seconds
    compile_backend: str
    memory_budget_gib: float | None = None  # None: a fraction of the GPU's memory


GPU = Plan("large", [2.5, 5.0, 7.5, 10.0, 15.0, 20.0], "bf16", 0.1, 2, 4,
           {"env": 20, "calibrate": 150, "eager": 60, "mixed": 40, "syncs": 30, "compile": 150}, "inductor")
DRY = Plan("tiny", [0.4, 0.6, 0.8, 1.0, 1.3, 1.6], "fp32", 0.5, 1, 2,
           {"env": 10, "calibrate": 30, "eager": 15, "mixed": 10, "syncs": 10, "compile": 40}, "aot_eager", 0.012)


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise PhaseTimeout in the main thread after ``seconds`` (between Python bytecodes)."""
    def expire(signum, frame):
        raise PhaseTimeout(f"reached its cap of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Run:
    """The state shared by the phases, and the JSON-lines report."""

    def __init__(self, plan: Plan, out: Path, device: torch.device, peak_tflops: float | None):
        self.plan, self.out, self.device = plan, out, device
        self.cuda = device.type == "cuda"
        self.results = open(out / "results.jsonl", "w")
        self.failed = False
        self.cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model if plan.preset == "tiny" \
            else model_preset(plan.preset)
        self.peak_tflops = peak_tflops
        self.step: TrainingStep | None = None
        self.budget = 0
        self.buckets: list[tuple[float, int]] = []  # (upper seconds, batch size)
        self.flops: dict[float, int] = {}  # per bucket

    def emit(self, phase: str, **fields) -> None:
        line = json.dumps({"phase": phase, **fields})
        print(line, flush=True)
        self.results.write(line + "\n")
        self.results.flush()

    def sync(self) -> None:
        synchronize(self.device)

    def batch(self, upper: float, size: int):
        return synthetic_batch(self.cfg, size, int(upper * self.cfg.preprocessor.sample_rate), self.device)

    def reset_memory(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.reset_accumulated_memory_stats(self.device)

    def memory(self) -> dict:
        if not self.cuda:
            return {}
        stats = torch.cuda.memory_stats(self.device)
        return {"allocated_gib": round(stats["allocated_bytes.all.peak"] / GIB, 3),
                "reserved_gib": round(stats["reserved_bytes.all.peak"] / GIB, 3),
                "budget_gib": round(self.budget / GIB, 3), "alloc_retries": stats["num_alloc_retries"],
                "device_gib": round(torch.cuda.get_device_properties(self.device).total_memory / GIB, 3)}

    def timed_step(self, batch) -> float:
        return timed(lambda: self.step.run(batch), self.device)

    def rates(self, upper: float, size: int, step_s: float) -> dict:
        figures = {"step_s": round(step_s, 4), "audio_s_per_s": round(upper * size / step_s, 1)}
        if upper in self.flops:
            figures["tflops"] = float(f"{self.flops[upper] / step_s / 1e12:.4g}")
            if self.peak_tflops:
                figures["mfu"] = float(f"{self.flops[upper] / step_s / 1e12 / self.peak_tflops:.4g}")
        return figures


def phase_env(run: Run) -> None:
    versions = {}
    for package in ("torch", "torchaudio", "lhotse", "omegaconf", "soundfile", "numpy", "pyyaml"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    fields = {"python": platform.python_version(), "versions": versions, "cuda": torch.version.cuda,
              "device": str(run.device), "precision": run.plan.precision, "preset": run.plan.preset}
    dtype = torch.bfloat16 if run.plan.precision == "bf16" else torch.float32
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        name = props.name
        run.peak_tflops = run.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        fields.update(gpu=name, memory_gib=round(props.total_memory / GIB, 2), capability=f"{props.major}.{props.minor}",
                      sms=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                      allocator=use_training_allocator())
    fields["matmul_tflops"] = round(matmul_tflops(run.device, dtype, 8192 if run.cuda else 1024), 3)
    fields["peak_tflops"] = run.peak_tflops
    run.emit("env", **fields)


def phase_calibrate(run: Run) -> None:
    plan = run.plan
    run.step = TrainingStep(run.cfg, run.device, plan.precision)
    if plan.memory_budget_gib is None:
        budget = int(torch.cuda.get_device_properties(run.device).total_memory * 0.9)
    else:
        budget = int(plan.memory_budget_gib * GIB)
    allowance = tensor_bytes(p for p in run.step.model.parameters() if p.requires_grad)
    run.budget = budget - allowance
    found = []

    def done(result):
        found.append(result)
        run.emit("calibrate", upper_s=result.upper, batch_size=result.batch_size,
                 peak_gib=round(result.peak.allocated / GIB, 3), reserved_gib=round(result.peak.reserved / GIB, 3),
                 alloc_retries=result.peak.alloc_retries)

    t0 = time.perf_counter()
    try:
        calibrate(run.step, plan.uppers, run.budget, plan.gap, check_device=run.step.check_device, on_bucket=done)
    finally:  # what was found, also when the cap ends the search
        merged = merge_equal_neighbours(sorted(found, key=lambda r: r.upper))
        run.buckets = [(r.upper, r.batch_size) for r in merged]
        if merged:
            save_batch_sizes(merged, run.out / "batch_sizes.yaml", {
                "device": torch.cuda.get_device_name(run.device) if run.cuda else "cpu", "precision": plan.precision,
                "budget_gib": round(budget / GIB, 3), "ddp_allowance_gib": round(allowance / GIB, 3), "gap": plan.gap})
        run.emit("calibrate", summary=True, seconds=round(time.perf_counter() - t0, 1), buckets=run.buckets,
                 budget_gib=round(run.budget / GIB, 3), ddp_allowance_gib=round(allowance / GIB, 3))


def phase_eager(run: Run) -> None:
    for upper, size in sorted(run.buckets, key=lambda b: -b[0]):
        batch = run.batch(upper, size)
        for _ in range(run.plan.warmup):
            run.step.run(batch)
        run.flops[upper] = counted_flops(lambda: run.step.run(batch))
        run.reset_memory()
        step_s = statistics.median(run.timed_step(batch) for _ in range(run.plan.steps))
        run.emit("eager", upper_s=upper, batch_size=size, gflop_per_audio_s=round(run.flops[upper] / upper / size / 1e9, 3),
                 **run.rates(upper, size, step_s), **run.memory())


def mixed_order(run: Run, phase: str, rounds: int = 3) -> None:
    """The buckets in random order, ``rounds`` times each: what the bucketing sampler feeds a run."""
    order = [b for b in run.buckets for _ in range(rounds)]
    random.Random(0).shuffle(order)
    batches = {upper: run.batch(upper, size) for upper, size in run.buckets}
    run.reset_memory()
    times, ooms, audio = [], 0, 0.0
    for upper, size in order:
        try:
            times.append(run.timed_step(batches[upper]))
            audio += upper * size
        except torch.OutOfMemoryError:
            ooms += 1
            run.step.abandon_try(run.cuda)
    run.emit(phase, steps=len(times), out_of_memory=ooms, audio_s_per_s=round(audio / sum(times), 1),
             step_s_max=round(max(times), 4), **run.memory())


def phase_mixed(run: Run) -> None:
    mixed_order(run, "mixed")


def phase_syncs(run: Run) -> None:
    upper, size = max(run.buckets)
    batch = run.batch(upper, size)
    run.step.run(batch)
    run.sync()
    with HostSyncCounter("cuda" if run.cuda else None) as syncs:
        run.step.run(batch)
    debug_warnings = None
    if run.cuda:
        run.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run.step.run(batch)
                run.sync()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        debug_warnings = [str(w.message).splitlines()[0][:200] for w in caught if "ynchroniz" in str(w.message)]
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if run.cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            run.step.run(batch)
    names = [e.name for e in prof.events()]
    wanted = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")
    (run.out / "syncs_profile.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    attention = sorted({n for n in names if "scaled_dot_product" in n or "fmha" in n.lower() or "flash" in n.lower()})
    run.emit("syncs", host_syncs_per_step=syncs.count, host_sync_ops=dict(syncs.calls),
             sync_debug_warnings=debug_warnings, profiled_steps=2,
             profiler_counts={w: names.count(w) for w in wanted}, sdpa_kernels=[n[:120] for n in attention])


def phase_compile(run: Run) -> None:
    from torch._dynamo.utils import counters, get_compilation_metrics

    torch._dynamo.reset()
    counters.clear()
    run.step.model.compile_encoder(backend=run.plan.compile_backend)
    first_total = 0.0
    for upper, size in sorted(run.buckets, key=lambda b: -b[0]):
        batch = run.batch(upper, size)
        first = run.timed_step(batch)
        run.reset_memory()
        step_s = statistics.median(run.timed_step(batch) for _ in range(run.plan.steps))
        first_total += max(0.0, first - step_s)
        run.emit("compile", upper_s=upper, batch_size=size, first_step_s=round(first, 2),
                 **run.rates(upper, size, step_s), **run.memory())
    mixed_order(run, "compile_mixed", rounds=2)
    metrics = get_compilation_metrics()
    run.emit("compile", summary=True, backend=run.plan.compile_backend, compile_s=round(first_total, 1),
             graphs=counters["stats"]["unique_graphs"], recompiles=sum(1 for m in metrics if m.recompile_reason),
             recompile_reasons=[m.recompile_reason[:200] for m in metrics if m.recompile_reason][:5])


PHASES = {"env": phase_env, "calibrate": phase_calibrate, "eager": phase_eager, "mixed": phase_mixed,
          "syncs": phase_syncs, "compile": phase_compile}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_acceptance", help="folder for results.jsonl, batch_sizes.yaml, profile")
    ap.add_argument("--dry-run", action="store_true", help="every phase on CPU with the tiny model (CI)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset, in the order above")
    ap.add_argument("--cap-scale", type=float, default=1.0, help="multiply every phase's time cap (slow machines)")
    args = ap.parse_args(argv)
    plan = DRY if args.dry_run else GPU
    if not args.dry_run:
        use_training_allocator()  # before the first CUDA allocation, as training does
        if not torch.cuda.is_available():
            print("error: no CUDA device is visible (use --dry-run to try the phases on CPU)", file=sys.stderr)
            return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    run = Run(plan, out, torch.device("cpu" if args.dry_run else "cuda"), args.peak_tflops)
    wanted = args.phases.split(",")
    started = time.perf_counter()
    for name, phase in PHASES.items():
        if name not in wanted:
            continue
        if name not in ("env", "calibrate") and not run.buckets:
            run.emit(name, skipped="no calibrated batch sizes")
            continue
        t0 = time.perf_counter()
        try:
            with time_cap(plan.caps[name] * args.cap_scale):
                phase(run)
        except PhaseTimeout as e:
            run.emit(name, timed_out=True, message=str(e))
            if run.step is not None:
                run.step.abandon_try(run.cuda)
        except Exception as e:  # noqa: BLE001  (one phase's failure is reported; the next phases still run)
            run.failed = True
            run.emit(name, error=error_line(e)[:300])
            if run.step is not None:
                run.step.abandon_try(run.cuda)
        run.emit(name, done=True, seconds=round(time.perf_counter() - t0, 1))
    run.emit("total", seconds=round(time.perf_counter() - started, 1), failed=run.failed)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
