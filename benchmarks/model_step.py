"""Forward + backward time of a NEST preset on one batch; prints one JSON object.

  python benchmarks/model_step.py --preset large --batch 8 --seconds 16 [--device cuda] [--precision bf16]

``audio_s_per_s`` is seconds of audio per second of training step (forward, backward, fused AdamW).
``host_syncs_per_step`` counts the host-device synchronisations of one such step (nest/training/syncs.py; on CPU
the CPU stands in for the device), ``host_sync_ops`` names them.
``explicit_attention_audio_s_per_s`` times the same model with attention computed as NeMo does by
default (scores, masked softmax, matmul) instead of PyTorch's fused SDPA, in the same run, so their
ratio compares the two on the same machine.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

from nest.model.conformer import NEG_INF, RelPositionMultiHeadAttention  # noqa: E402
from nest.objectives import NestModel, model_preset  # noqa: E402
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


def count_syncs(model, audio, lens, device, dtype) -> HostSyncCounter:
    """Host synchronisations of one training step, after a warm-up step (optimizer state created)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    train_step(model, opt, audio, lens, device, dtype)
    with HostSyncCounter(None if device.type == "cpu" else device.type) as syncs:
        train_step(model, opt, audio, lens, device, dtype)
    return syncs


def time_steps(model, audio, lens, steps, warmup, device, dtype) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, opt, audio, lens, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = NestModel(model_preset(args.preset)).to(device).train()
    samples = int(args.seconds * 16000)
    audio = 0.1 * torch.randn(args.batch, samples, device=device)
    lens = torch.full((args.batch,), samples, device=device)
    syncs = count_syncs(model, audio, lens, device, dtype)
    sdpa = time_steps(model, audio, lens, args.steps, args.warmup, device, dtype)
    original = RelPositionMultiHeadAttention.forward
    RelPositionMultiHeadAttention.forward = explicit_attention
    try:
        explicit = time_steps(model, audio, lens, args.steps, args.warmup, device, dtype)
    finally:
        RelPositionMultiHeadAttention.forward = original
    audio_s = args.batch * args.seconds
    print(json.dumps({
        "preset": args.preset, "batch": args.batch, "seconds_per_utterance": args.seconds,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "precision": args.precision, "torch": torch.__version__,
        "step_s": sdpa, "audio_s_per_s": audio_s / sdpa,
        "explicit_attention_step_s": explicit, "explicit_attention_audio_s_per_s": audio_s / explicit,
        "sdpa_speedup": explicit / sdpa,
        "host_syncs_per_step": syncs.count, "host_sync_ops": dict(syncs.calls), "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
