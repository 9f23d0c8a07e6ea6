"""Print what a training run did, after reloading its last checkpoint: python -m nest.summary EXP_DIR"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nest.checkpoint import load_model


def main(argv=None) -> int:
    exp = Path((argv or sys.argv[1:])[0])
    summary = json.loads((exp / "summary.json").read_text())
    ckpt = exp / "checkpoints" / "last.ckpt"
    model = load_model(ckpt)  # proves the checkpoint reloads as plain data
    encoded, lens = model.encode(torch.zeros(1, 16000), torch.tensor([16000]))
    summary["checkpoint"] = str(ckpt)
    summary["reloaded_encoder_output"] = list(encoded.shape)
    print(json.dumps(summary, indent=1))
    print(f"\ntrained {summary['steps']} steps on {summary['audio_hours_seen']:.2f} h of audio "
          f"(padding {100 * summary['padding_ratio']:.1f}%): loss {summary['first_loss']:.3f} -> "
          f"{summary['last_loss']:.3f}")
    if not summary["last_loss"] < summary["first_loss"]:
        print("the loss did not go down", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
