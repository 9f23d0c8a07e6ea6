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
from a custom key of the cut, or from the folders of its id (``folder:N``: a corpus laid out
``spk/utt.wav`` gives speakers with ``folder:-1``). Prints one JSON object and writes OUT/probe.json and OUT/probe.png
(layer weights and the dev confusion matrix). ``--cache DIR`` keeps the frame-level features as Lhotse
arrays (the layout of ``nest.extract --format lhotse``) keyed by checkpoint, cuts and layers, so that
other seeds, epochs or heads on the same features never run the encoder again.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nest.probe_features import CKPT_KINDS, FeatureSet, ProbeError, features_for, open_manifest, read_labels

LAYER_LR_SCALE = 10.0  # the layer logits learn this much faster than the classifier: few probe steps


class LayerWeightedSum(nn.Module):
    """x (B, L, ...) -> (B, ...): the sum over layers weighted by softmax(logits), uniform at the start."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def weights(self) -> torch.Tensor:
        return self.logits.softmax(0)  # (L,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights().to(x.dtype).view(1, -1, *[1] * (x.dim() - 2))
        return (w * x).sum(1)


class ProbeHead(nn.Module):
    """Pooled layers (B, L, D) -> logits (B, C): standardise, weighted sum over layers, a small MLP (or linear).

    ``mean`` and ``std`` (L, D) are the train split's, fixed: every layer enters the weighted sum at one
    scale, so that its weight says how useful it is rather than how loud, and no running statistics
    make train and eval differ.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int, hidden: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        num_layers, dim = mean.shape
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.aggregate = LayerWeightedSum(num_layers)
        if hidden > 0:
            self.classifier = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                            nn.Linear(hidden, num_classes))
        else:
            self.classifier = nn.Linear(dim, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.aggregate((pooled - self.mean) / self.std))


def standardisation(pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and dimension mean and std (N, L, D) -> (L, D) each; a constant dimension stays finite."""
    mean, std = pooled.mean(0), pooled.std(0)
    return mean, std.clamp(min=1e-3 * float(std.median()) + 1e-8)


def fit_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, seed: int, lr: float,
             batch_size: int, hidden: int) -> ProbeHead:
    """AdamW on (N, L, D) pooled features, seeded: initialisation, shuffling and dropout."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a head this small runs faster on one thread than on several contending ones
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = ProbeHead(*standardisation(x), num_classes, hidden=hidden)
            rest = [p for n, p in head.named_parameters() if not n.startswith("aggregate.")]
            opt = torch.optim.AdamW([
                {"params": head.aggregate.parameters(), "lr": lr * LAYER_LR_SCALE, "weight_decay": 0.0},
                {"params": rest, "lr": lr},
            ], weight_decay=1e-2)
            head.train()
            for _ in range(epochs):
                order = torch.randperm(len(y))
                for start in range(0, len(y), batch_size):
                    sel = order[start : start + batch_size]
                    loss = F.cross_entropy(head(x[sel]), y[sel])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    return head.eval()


def train_probe(
    train: FeatureSet, dev: FeatureSet, classes: list[str], epochs: int, seed: int, lr: float = 1e-3,
    batch_size: int = 32, hidden: int = 256,
) -> dict:
    """Train the head on train's pooled features, evaluate on dev: metrics, layer weights, confusion."""
    index = {c: i for i, c in enumerate(classes)}
    x, y = train.pooled, torch.tensor([index[c] for c in train.labels])
    x_dev, y_dev = dev.pooled, torch.tensor([index[c] for c in dev.labels])
    head = fit_head(x, y, len(classes), epochs, seed, lr, batch_size, hidden)
    with torch.no_grad():
        logits, logits_dev = head(x), head(x_dev)
        weights = head.aggregate.weights()
    pred = logits_dev.argmax(-1)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    confusion.index_put_((y_dev, pred), torch.ones_like(y_dev), accumulate=True)
    return {
        "accuracy": (pred == y_dev).float().mean().item(),
        "loss": F.cross_entropy(logits_dev, y_dev).item(),
        "train_accuracy": (logits.argmax(-1) == y).float().mean().item(),
        "train_loss": F.cross_entropy(logits, y).item(),
        "layer_weights": [round(w, 6) for w in weights.tolist()],
        "confusion": confusion.tolist(),
    }


def plot(result: dict, classes: list[str], path: Path) -> None:
    """Layer weights (bars) beside the dev confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    layers, weights = result["layers"], result["layer_weights"]
    a.bar([str(i) for i in layers], weights)
    a.axhline(1 / len(weights), color="gray", ls="--", lw=1, label="uniform (start)")
    a.set(xlabel="layer", ylabel="weight", title="layer weights (softmax)")
    a.legend()
    im = b.imshow(np.asarray(result["confusion"]), cmap="Blues")
    fig.colorbar(im, ax=b)
    b.set(xlabel="predicted", ylabel="true", title=f"dev confusion, accuracy {result['accuracy']:.3f}")
    if len(classes) <= 30:
        b.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        b.set_yticks(range(len(classes)), classes, fontsize=7)
    fig.suptitle(f"{result['checkpoint']}  label={result['label']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_probe(
    ckpt: str, train: str, dev: str, label: str, layers: str = "all", epochs: int = 40, seed: int = 0,
    cache: Optional[str | Path] = None, out: Optional[str | Path] = None, batch_size: int = 8,
    probe_batch_size: int = 32, lr: float = 1e-3, hidden: int = 256, device: Optional[str] = None,
) -> dict:
    """The whole probe; returns what the CLI prints. ``out`` receives probe.json and probe.png."""
    manifests = {"train": train, "dev": dev}
    labels = {s: read_labels(open_manifest(m, f"--{s}"), label, f"--{s} {m}") for s, m in manifests.items()}
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
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help=CKPT_KINDS)
    ap.add_argument("--train", required=True, help="CutSet manifest (or Shar folder) the head trains on")
    ap.add_argument("--dev", required=True, help="CutSet manifest (or Shar folder) the head is scored on")
    ap.add_argument("--label", required=True, help="speaker, language, text, gender, a custom key, or folder:N (the "
                    "N-th folder of the cut id, e.g. folder:-1 for spk1 of sessionA/spk1/001)")
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_probe(args.ckpt, args.train, args.dev, args.label, args.layers, args.epochs, args.seed,
                           args.cache, args.out, args.batch_size, lr=args.lr, hidden=args.hidden, device=args.device)
    except ProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.pop("confusion")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
