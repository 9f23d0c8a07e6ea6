"""Does pretraining help? A frozen-encoder probe with multi-layer feature aggregation.

  python -m nest.probe CKPT --train CUTS --dev CUTS --label FIELD [--layers all] [--epochs 40]
                        [--seed 0] [--cache DIR] [--out DIR]

CKPT is one of our checkpoints (train.py's ``.ckpt``, ``save_model``'s file), a NeMo ``.nemo`` file,
``random:configs/X.yaml`` (that config's model at a random initialisation drawn with ``--seed``: the
baseline), or ``mel`` / ``mel:configs/X.yaml`` (log-mel of that front end, no encoder: the floor).

The encoder is frozen and in eval mode. Each chosen layer's output is mean-pooled over the cut's valid
frames; a learned softmax-weighted sum over the layers (weights start uniform at 1/L, as NeMo's
``Aggregator(mode="weighted_sum")``; NeMo keeps them unconstrained, here a softmax keeps them readable as
shares, as SUPERB does) feeds a small classifier. The weighted sum and the mean are both linear, so
pooling each layer first and weighting after gives the vector that weighting frames first would: the
encoder runs once per cut, and the epochs run on (L, D) vectors.

Labels come from the first supervision (``speaker``, ``language``, ``text``, ``gender`` or a custom key),
from a custom key of the cut, from the folders of its id (``folder:N``: a corpus laid out
``spk/utt.wav`` gives speakers with ``folder:-1``), or from a regular expression over its id (``re:REGEX``,
its first group: ``re:^(\\d)_`` gives the digit of ``7_george_12``). Prints one JSON object and writes
OUT/probe.json and OUT/probe.png (layer weights and the dev confusion matrix). ``--cache DIR`` keeps the frame-level features as Lhotse
arrays (the layout of ``nest.extract --format lhotse``) keyed by checkpoint, cuts and layers, so that
other seeds, epochs or heads on the same features never run the encoder again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from cuts.console import HelpFormatter, configure_logging, one_line
from nest.errors import ProbeError
from nest.config.load import open_manifest
from nest.probe.features import CKPT_KINDS, features_for, read_labels
from nest.probe.head import plot, train_probe


def run_probe(
    ckpt: str, train: str, dev: str, label: str, layers: str = "all", epochs: int = 40, seed: int = 0,
    cache: Optional[str | Path] = None, out: Optional[str | Path] = None, batch_size: int = 8,
    probe_batch_size: int = 32, lr: float = 1e-3, hidden: int = 256, device: Optional[str] = None,
) -> dict:
    """The whole probe; returns what the CLI prints. ``out`` receives probe.json and probe.png."""
    manifests = {"train": train, "dev": dev}
    labels = {s: read_labels(open_manifest(m, f"--{s}", ProbeError), label, f"--{s} {m}")
              for s, m in manifests.items()}
    classes = sorted(set(labels["train"].values()))
    if len(classes) < 2:
        raise ProbeError(f"--train {train}: every cut has {label}={classes[0]!r}; a probe needs two classes or more")
    unseen = sorted(set(labels["dev"].values()) - set(classes))
    if unseen:
        raise ProbeError(f"--dev {dev}: labels absent from --train ({len(unseen)}): {unseen[:10]}; a closed-set "
                         f"probe cannot predict them: filter them out or add them to the train cuts")
    dev_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    feats, cache_status = features_for(ckpt, seed, manifests, labels, layers, batch_size, dev_device,
                                       Path(cache) if cache else None)
    result = {"checkpoint": ckpt, "label": label, "layers": feats["train"].layers}
    result.update(train_probe(feats["train"], feats["dev"], classes, epochs, seed, lr, probe_batch_size, hidden))
    result.update({
        "num_train": len(feats["train"].ids), "num_dev": len(feats["dev"].ids), "num_classes": len(classes),
        "majority_baseline": max(feats["dev"].labels.count(c) for c in classes) / len(feats["dev"].ids),
        "failed_cuts": {s: len(f.failed) for s, f in feats.items()}, "classes": classes, "epochs": epochs,
        "seed": seed, "cache": cache_status,
    })
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result["png"] = str(out / "probe.png")
        plot(result, classes, out / "probe.png")
        (out / "probe.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nest.probe", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("ckpt", help=CKPT_KINDS)
    ap.add_argument("--train", required=True, help="CutSet manifest (or Shar folder) the head trains on")
    ap.add_argument("--dev", required=True, help="CutSet manifest (or Shar folder) the head is scored on")
    ap.add_argument("--label", required=True, help="speaker, language, text, gender, a custom key, folder:N (the "
                    "N-th folder of the cut id, e.g. folder:-1 for spk1 of sessionA/spk1/001) or re:REGEX (the first "
                    "group of REGEX searched in the cut id, e.g. 're:^(\\d)_' for the 7 of 7_george_12)")
    ap.add_argument("--layers", default="all", help="all, or comma-separated layer indices (negative from the end)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="head, shuffling and, for random:, the encoder's weights")
    ap.add_argument("--cache", default=None, help="folder for frame-level features (Lhotse arrays), reused")
    ap.add_argument("--out", default="exp/probe", help="folder for probe.json and probe.png")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=256, help="hidden units of the classifier; 0: linear")
    ap.add_argument("--batch-size", type=int, default=8, help="cuts per encoder batch")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    configure_logging()
    try:
        result = run_probe(args.ckpt, args.train, args.dev, args.label, args.layers, args.epochs, args.seed,
                           args.cache, args.out, args.batch_size, lr=args.lr, hidden=args.hidden, device=args.device)
    except ProbeError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    result.pop("confusion")
    print(json.dumps(result))
    return 0

