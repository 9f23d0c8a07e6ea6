"""k-means targets carried by cuts (``prepare.py kmeans``): read one cut's, pad a batch's.

A labelled cut has a TemporalArray ``targets`` of shape (T', R): T' = the tokens the encoder makes for
the cut (80 ms each), R = labels per token (8 for 10 ms MFCC labels, 1 for encoder-feature labels),
-1 where a position has no label; and an int ``targets_num_classes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from lhotse.cut import Cut, MixedCut

IGNORE = -1  # a position without a label; left out of the loss


def _labelled_cut(cut: Cut) -> Cut:
    """The cut carrying the labels: for a MixedCut (noise, speech-in-speech) its first track's cut."""
    while isinstance(cut, MixedCut):
        cut = cut.tracks[0].cut
    return cut


def load_targets(cut: Cut) -> np.ndarray:
    """(T', R) int64 labels of ``cut``.

    The whole stored array is read: Lhotse's duration-based slicing rounds to whole 80 ms tokens and
    would drop the last, partial token that the encoder does make.
    """
    labelled = _labelled_cut(cut)
    targets = (labelled.custom or {}).get("targets")
    if targets is None:
        raise KeyError(f"cut {cut.id!r} has no 'targets': label its CutSet first "
                       "(nest-prepare kmeans CUTS OUT_DIR ...) and train on OUT_DIR/cuts.jsonl.gz")
    arr = targets.load()
    return np.asarray(arr, dtype=np.int64).reshape(arr.shape[0], -1)


@dataclass(frozen=True)
class TargetsSpec:
    """What a labelled cut's targets need from the model, read from the manifest alone."""

    num_classes: int  # k-means clusters: model.quantizer.num_classes
    labels_per_token: int  # R: model.quantizer.num_books
    token_shift: float  # seconds per token: subsampling_factor x window_stride


def targets_spec(cut: Cut) -> TargetsSpec:
    """The targets' layout of ``cut`` without reading any array (no HDF5 file opened in this process)."""
    labelled = _labelled_cut(cut)
    custom = labelled.custom or {}
    if "targets" not in custom or "targets_num_classes" not in custom:
        raise KeyError(f"cut {cut.id!r} has no 'targets'/'targets_num_classes': label its CutSet first "
                       "(nest-prepare kmeans CUTS OUT_DIR ...) and train on OUT_DIR/cuts.jsonl.gz")
    shape = custom["targets"].shape
    return TargetsSpec(int(custom["targets_num_classes"]), int(shape[1]) if len(shape) > 1 else 1,
                       float(custom["targets"].frame_shift))


def collate_targets(targets: Sequence[np.ndarray]) -> torch.Tensor:
    """(T'_i, R) arrays -> (B, T'max, R) int64, padded with -1."""
    if not targets:
        return torch.full((0, 0, 1), IGNORE, dtype=torch.int64)
    R = {t.shape[1] for t in targets}
    if len(R) > 1:
        raise ValueError(f"targets with different labels per token in one batch: {sorted(R)}; "
                         "the cuts come from different k-means fits")
    out = torch.full((len(targets), max(len(t) for t in targets), R.pop()), IGNORE, dtype=torch.int64)
    for i, t in enumerate(targets):
        out[i, : len(t)] = torch.from_numpy(np.asarray(t, dtype=np.int64))
    return out
