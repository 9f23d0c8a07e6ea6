"""Forward + backward time of a NEST preset on one batch; prints one JSON object.

  python benchmarks/model_step.py --preset large --batch 8 --seconds 16 [--device cuda] [--precision bf16]
  python benchmarks/model_step.py --preset large --seconds 10 --flops --device meta     # count only, no memory
  python benchmarks/model_step.py --preset small --flops [--peak-tflops 989]            # + FLOP/s, matmul, MFU
  python benchmarks/model_step.py --preset small --compile [marked|default|static]      # bucket shapes compiled

``audio_s_per_s`` is seconds of audio per second of training step (forward, backward, fused AdamW).
``host_syncs_per_step`` counts the host-device synchronisations of one such step (nest/training/syncs.py; on CPU
the CPU stands in for the device), ``host_sync_ops`` names them.
``explicit_attention_audio_s_per_s`` times the same model with attention computed as NeMo does by
default (scores, masked softmax, matmul) instead of PyTorch's fused SDPA, in the same run, so their
ratio compares the two on the same machine.

``--flops``: ``gflop_per_audio_s``, the forward and backward FLOPs of the step per second of audio, counted by
torch.utils.flop_counter with its grouped-convolution error corrected (nest/training/flops.py); on a real device
also ``step_tflops`` (FLOPs over the step's time), ``matmul_tflops`` (a large matrix product timed between the steps,
same dtype: the machine's practical peak), their ratio ``step_over_matmul``, and with ``--peak-tflops X`` (the
device's dense peak for the dtype) ``mfu``.

``--compile MODE``: the encoder compiled as training compiles it (``marked``: model.compile, batch and time marked
dynamic), or with torch's default (``default``) or ``dynamic=False`` (``static``), then run over 8 bucket shapes
of about the same audio per batch, from many short utterances to one long one: ``compile_s`` (seconds of the
first step at each shape above a second one), ``graphs`` (Dynamo's graphs), ``recompiles``,
``recompile_limit_hit`` (torch then runs the frame eagerly), and the compiled and eager audio-s/s over the shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

from nest.model.conformer import NEG_INF, RelPositionMultiHeadAttention  # noqa: E402
from nest.objectives import NestModel, model_preset  # noqa: E402
from nest.training.flops import counted_flops  # noqa: E402
from nest.training.syncs import HostSyncCounter  # noqa: E402


def explicit_attention(self, x, pos_emb, att_mask):
    """The attention of RelPositionMultiHeadAttention without SDPA (NeMo's use_pytorch_sdpa=False)."""
    B, T, _ = x.shape
    q = self.linear_q(x).view(B, T, self.h, self.d_k)
    k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)
    v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
    p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)
    ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
    bd = self.rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))[..., :T]
    scores = ((ac + bd) / math.sqrt(self.d_k)).masked_fill(att_mask[:, None], NEG_INF)
    attn = torch.softmax(scores, -1).masked_fill(att_mask[:, None], 0.0)
    out = torch.matmul(F.dropout(attn, self.dropout_rate, self.training), v)
    return self.linear_out(out.transpose(1, 2).reshape(B, T, -1))


def train_step(model, opt, audio, lens, device, dtype) -> None:
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(audio, lens, audio, lens)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def count_syncs(model, audio, lens, device, dtype) -> HostSyncCounter:
    """Host synchronisations of one training step, after a warm-up step (optimizer state created)."""
    opt = make_optimizer(model)
    train_step(model, opt, audio, lens, device, dtype)
    with HostSyncCounter(None if device.type == "cpu" else device.type) as syncs:
        train_step(model, opt, audio, lens, device, dtype)
    return syncs


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - t0


def time_steps(model, audio, lens, steps, warmup, device, dtype) -> float:
    opt = make_optimizer(model)
    times = [timed(lambda: train_step(model, opt, audio, lens, device, dtype), device) for _ in range(warmup + steps)]
    return sorted(times[warmup:])[steps // 2]


def step_flops(model, audio, lens, dtype) -> int:
    """Forward and backward FLOPs of one step (the optimizer's elementwise update is not counted)."""
    def run():  # the meta device has no autocast; FLOPs do not depend on the dtype
        with torch.autocast(audio.device.type, dtype=dtype, enabled=dtype != torch.float32) \
                if torch.amp.is_autocast_available(audio.device.type) else contextlib.nullcontext():
            out = model(audio, lens, audio, lens)
        out.loss.backward()

    flops = counted_flops(run)
    model.zero_grad(set_to_none=True)
    return flops


def matmul_tflops(device, dtype, n: int, repeats: int = 5) -> float:
    """TFLOP/s of an n x n matrix product on ``device`` in ``dtype``: the practical peak the step is held to."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def step_against_matmul(model, audio, lens, flops, steps, warmup, device, dtype) -> dict:
    """The step's TFLOP/s and a large matrix product's, timed alternately so that both see the same machine (a
    shared one's load changes by the minute): medians of each."""
    opt, n = make_optimizer(model), 8192 if device.type == "cuda" else 2048
    step_s, matmul = [], []
    for i in range(warmup + steps):
        t = timed(lambda: train_step(model, opt, audio, lens, device, dtype), device)
        if i >= warmup:
            step_s.append(t)
            matmul.append(matmul_tflops(device, dtype, n, repeats=2))
    step_tflops, matmul = flops / statistics.median(step_s) / 1e12, statistics.median(matmul)
    return {"step_tflops": step_tflops, "matmul_tflops": matmul, "step_over_matmul": step_tflops / matmul}


def bucket_shapes(batch: int, seconds: float) -> list[tuple[int, float]]:
    """8 (utterances, seconds) shapes of about ``batch * seconds`` audio each, as 8 calibrated buckets give."""
    audio = batch * seconds
    return [(max(1, round(audio / d)), d) for d in (seconds * f for f in (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8))]


def shape_batches(shapes, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for b, sec in shapes:
        audio = 0.1 * torch.randn(b, int(sec * 16000), device=device)
        batches.append((audio, torch.full((b,), audio.shape[1], device=device)))
    return batches


def compile_report(model, mode: str, shapes, device, dtype, backend: str = "inductor") -> dict:
    """Every shape twice eagerly, then compiled (``mode``) twice: what torch compiled, and both speeds."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    batches, opt = shape_batches(shapes, device), make_optimizer(model)
    run = lambda: [timed(lambda: train_step(model, opt, *ab, device, dtype), device) for ab in batches]  # noqa: E731
    run()
    eager = run()
    torch._dynamo.reset()
    counters.clear()
    if mode == "marked":
        model.compile_encoder(backend=backend)
    else:
        model.encoder.compile(backend=backend, **({"dynamic": False} if mode == "static" else {}))
    first, second = run(), run()
    metrics = get_compilation_metrics()
    audio_s = sum(b * sec for b, sec in shapes)
    return {
        "compile_mode": mode, "backend": backend, "shapes": [f"{b}x{sec:g}s" for b, sec in shapes],
        "compile_s": round(sum(max(0.0, f - s) for f, s in zip(first, second)), 1),
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(1 for m in metrics if m.recompile_reason),
        "recompile_limit_hit": any("recompile limit" in (m.fail_reason or "").lower() for m in metrics),
        "compiled_audio_s_per_s": audio_s / sum(second), "eager_audio_s_per_s": audio_s / sum(eager),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cpu or meta")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--flops", action="store_true", help="count FLOPs; with a real device also FLOP/s and matmul")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak: gives mfu")
    ap.add_argument("--compile", nargs="?", const="marked", choices=["marked", "default", "static"], default=None)
    ap.add_argument("--compile-backend", default="inductor", help="aot_eager: Dynamo's graphs without Inductor's code")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    with device if device.type == "meta" else contextlib.nullcontext():
        model = NestModel(model_preset(args.preset)).to(device).train()
    samples = int(args.seconds * 16000)
    audio = 0.1 * torch.randn(args.batch, samples, device=device)
    lens = torch.full((args.batch,), samples, device=device)
    audio_s = args.batch * args.seconds
    result = {
        "preset": args.preset, "batch": args.batch, "seconds_per_utterance": args.seconds,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type if device.type == "meta"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "precision": args.precision, "torch": torch.__version__,
    }
    flops = None
    if args.flops or device.type == "meta":
        flops = step_flops(model, audio, lens, dtype)
        result.update(gflop_per_step=flops / 1e9, gflop_per_audio_s=flops / audio_s / 1e9)
    if device.type == "meta":  # shapes only: nothing to time
        print(json.dumps({**result, "date": time.strftime("%Y-%m-%d")}))
        return
    if args.compile:
        result.update(compile_report(model, args.compile, bucket_shapes(args.batch, args.seconds), device, dtype,
                                     args.compile_backend))
        print(json.dumps({**result, "date": time.strftime("%Y-%m-%d")}))
        return
    syncs = count_syncs(model, audio, lens, device, dtype)
    sdpa = time_steps(model, audio, lens, args.steps, args.warmup, device, dtype)
    original = RelPositionMultiHeadAttention.forward
    RelPositionMultiHeadAttention.forward = explicit_attention
    try:
        explicit = time_steps(model, audio, lens, args.steps, args.warmup, device, dtype)
    finally:
        RelPositionMultiHeadAttention.forward = original
    result.update({
        "step_s": sdpa, "audio_s_per_s": audio_s / sdpa,
        "explicit_attention_step_s": explicit, "explicit_attention_audio_s_per_s": audio_s / explicit,
        "sdpa_speedup": explicit / sdpa,
        "host_syncs_per_step": syncs.count, "host_sync_ops": dict(syncs.calls),
    })
    if flops is not None:
        result.update(step_against_matmul(model, audio, lens, flops, args.steps, args.warmup, device, dtype))
        if args.peak_tflops:
            result.update(mfu=result["step_tflops"] / args.peak_tflops,
                          matmul_over_peak=result["matmul_tflops"] / args.peak_tflops)
    print(json.dumps({**result, "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
