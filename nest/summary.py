"""Print what a training run did, after reloading its last checkpoint: python -m nest.summary EXP_DIR"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nest.io.checkpoint import load_model


def main(argv=None) -> int:
    exp = Path((argv or sys.argv[1:])[0])
    summary = json.loads((exp / "summary.json").read_text())
    ckpt = exp / "checkpoints" / "last.ckpt"
    model = load_model(ckpt)  # proves the checkpoint reloads as plain data
    encoded, lens = model.encode(torch.zeros(1, 16000), torch.tensor([16000]))
    summary["checkpoint"] = str(ckpt)
    summary["reloaded_encoder_output"] = list(encoded.shape)
    print(json.dumps(summary, indent=1))
    print("\n" + summary_line(summary))
    first, last = summary.get("first_loss"), summary.get("last_loss")
    if first is None or last is None:
        print("no loss was recorded: no training step ran", file=sys.stderr)
        return 1
    if first == last:
        print("one logging window only: the loss cannot be compared (lower trainer.log_every_n_steps)",
              file=sys.stderr)
    elif not last < first:
        print("the loss did not go down", file=sys.stderr)
        return 1
    return 0


def summary_line(s: dict) -> str:
    """The one line a recipe ends with."""
    loss = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    padding = "n/a" if s.get("padding_ratio") is None else f"{100 * s['padding_ratio']:.1f}%"
    skipped = f", {s['skipped_steps']} skipped" if s.get("skipped_steps") else ""
    failed = f", {s['failed_cuts']} cuts failed to load" if s.get("failed_cuts") else ""
    return (f"trained {s['steps']} steps, {s['audio_hours_seen']:.2f} h of audio seen (padding {padding}{skipped}"
            f"{failed}): loss {loss(s.get('first_loss'))} -> {loss(s.get('last_loss'))}")


if __name__ == "__main__":
    sys.exit(main())
