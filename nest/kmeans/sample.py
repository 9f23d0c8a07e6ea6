"""The frames k-means is fit on: a seeded share of the cuts, chosen by a hash of their ids (the same for any order or
--jobs), widened on a small corpus until the fit has enough frames for its clusters.

A hashed 10% of 14 cuts is often none at all: when the share gives fewer than MIN_FRAMES_PER_CLUSTER frames per
cluster, the other cuts are added in the order of their hashes (as a larger --sample-fraction would add them) until
it does, or all of them are in; a warning says so, and summary.json's ``fit`` records the share used.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from lhotse.cut import Cut
from tqdm import tqdm

from nest.errors import FeatureError

log = logging.getLogger(__name__)
MIN_FRAMES_PER_CLUSTER = 40  # fewer frames than this per centroid fit noise more than structure

Featurize = Callable[[Iterable[Cut]], Iterator[tuple[Cut, Optional[np.ndarray]]]]


def sample_key(cut_id: str, seed: int) -> float:
    """A seeded hash of a cut id in [0, 1): the cut is in a sample of share ``f`` when its key is below ``f``."""
    h = hashlib.blake2b(f"{seed}:{cut_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def in_sample(cut_id: str, seed: int, fraction: float) -> bool:
    """Whether a cut is in the fit sample of share ``fraction``."""
    return fraction >= 1.0 or sample_key(cut_id, seed) < fraction


def fit_sample(cuts: Callable[[], Iterable[Cut]], featurize: Featurize, *, seed: int, fraction: float, clusters: int,
               what: str) -> tuple[np.ndarray, dict]:
    """Frames (N, D) of the cuts in the sample, widened to MIN_FRAMES_PER_CLUSTER x ``clusters`` frames where the
    corpus has them, and how they were chosen. ``cuts()`` reads the cuts afresh; ``featurize`` gives each cut's
    frame features (None where the audio fails). ``what`` names the input in messages."""
    need = clusters * MIN_FRAMES_PER_CLUSTER
    parts: list[np.ndarray] = []
    frames = count = 0
    sampled = (c for c in cuts() if in_sample(c.id, seed, fraction))
    for _, f in featurize(tqdm(sampled, desc="k-means sample")):
        count += 1
        if f is not None and len(f):
            parts.append(f)
            frames += len(f)
    share = fraction
    if frames < need and fraction < 1.0:
        first = (count, frames)
        rest = sorted(((sample_key(c.id, seed), c) for c in cuts() if not in_sample(c.id, seed, fraction)),
                      key=lambda kc: kc[0])
        share = 1.0
        with contextlib.closing(featurize(c for _, c in tqdm(rest, desc="k-means sample (more)"))) as more:
            for (key, _), (_, f) in zip(rest, more):
                count += 1
                if f is not None and len(f):
                    parts.append(f)
                    frames += len(f)
                if frames >= need:
                    share = key
                    break
        taken = f"all {count} cuts" if share >= 1.0 else f"{count} cuts, a share of {share:.3f}"
        log.warning("the fit sample of --sample-fraction %g (%d cuts, %d frames) is short of the %d frames %d clusters "
                    "need (%d each): the fit takes %s (%d frames)", fraction, *first, need, clusters,
                    MIN_FRAMES_PER_CLUSTER, taken, frames)
    if frames < clusters:
        raise FeatureError(
            f"no frames in {what}: the audio of no cut loaded (do the paths in the manifest exist on this machine?)"
            if not frames else
            f"{what} has {frames} frames in the fit sample{' (all its cuts)' if share >= 1.0 else ''}, fewer than "
            f"--clusters {clusters}: use --clusters {max(1, frames // MIN_FRAMES_PER_CLUSTER)} or fewer"
            + ("" if share >= 1.0 else ", or raise --sample-fraction"))
    if frames < need:
        log.warning("%s gives %d frames for %d clusters (%.0f each, %d wanted): the centroids will be noisy; use fewer "
                    "clusters or more audio", what, frames, clusters, frames / clusters, MIN_FRAMES_PER_CLUSTER)
    info = {"sample_fraction": fraction, "sample_fraction_used": share, "sample_cuts": count, "sample_frames": frames}
    return np.concatenate(parts), info
