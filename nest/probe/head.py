"""The probe's head: pooled layers (B, L, D) -> a softmax-weighted sum over layers -> a small classifier,
trained on frozen features, and its picture (layer weights, dev confusion matrix)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nest.probe.features import FeatureSet

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
