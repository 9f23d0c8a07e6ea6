"""Split a CutSet into train and dev by recording, exactly and in two streaming passes (``prepare.py split``).

Every cut of a recording goes to the same side (windows of one recording never straddle the split).
Dev is the ``round(fraction x recordings)`` recordings with the smallest seeded hashes: at least one
when the fraction is above 0, at most half, so that train always keeps the larger part. The memory
held is one 8-byte hash per cut; cuts keep their order, so a shuffled input stays shuffled.
"""
from __future__ import annotations

import json
import logging
from array import array
from pathlib import Path

import numpy as np

from cuts.io import ManifestError, atomic_write, iter_jsonl, key_hash, write_text

log = logging.getLogger(__name__)


class EmptySplit(ValueError):
    """The split would leave train without cuts."""


def recording_of(d: dict) -> str:
    """The recording id of a cut's JSON object (its own id when it has no recording)."""
    rec = d.get("recording")
    return str(rec["id"]) if isinstance(rec, dict) and "id" in rec else str(d.get("recording_id", d.get("id")))


def dev_count(num_recordings: int, fraction: float) -> int:
    """How many recordings go to dev: ``round(fraction x n)``, at least 1 if ``fraction > 0``, at most ``n // 2``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--dev-fraction must be in [0, 1), not {fraction}")
    k = round(fraction * num_recordings)
    if fraction > 0:
        k = max(k, 1)
    return min(k, num_recordings // 2)


def duration_of(where: str, d: dict) -> float:
    """A cut's duration in seconds; a missing, non-numeric or negative one is the line's error."""
    value = d.get("duration")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ManifestError(f"{where}: duration is {value!r}, not a number of seconds >= 0; fix or delete that line")
    return float(value)


def split_cuts(cuts_path: Path, out_dir: Path, dev_fraction: float, seed: int = 0) -> dict:
    """Write ``train.jsonl.gz`` and ``dev.jsonl.gz`` (and ``split.json``) under ``out_dir``."""
    hashes = array("Q")
    for where, d in iter_jsonl(cuts_path):
        duration_of(where, d)  # checked before anything is written
        hashes.append(key_hash(recording_of(d), seed))
    if not hashes:
        raise EmptySplit(f"{cuts_path} holds no cuts: nothing to train on")
    h = np.frombuffer(hashes, dtype=np.uint64)
    distinct = np.unique(h)
    num_recordings = len(distinct)
    k = dev_count(num_recordings, dev_fraction)
    if dev_fraction > 0 and k == 0:
        log.warning("dev gets none of %d recording(s): train keeps at least half, so training will run without "
                    "validation; give more recordings, or a dev set of your own", num_recordings)
    elif k != round(dev_fraction * num_recordings):
        log.warning("dev gets %d of %d recordings (--dev-fraction %s gives %.2f; dev has at least 1 and at most half)",
                    k, num_recordings, dev_fraction, dev_fraction * num_recordings)
    threshold = int(distinct[k - 1]) if k else -1
    del h, distinct
    out_dir = Path(out_dir)
    counts = {"train": [0, 0.0], "dev": [0, 0.0]}
    with atomic_write(out_dir / "train.jsonl.gz") as train, atomic_write(out_dir / "dev.jsonl.gz") as dev:
        for i, (where, d) in enumerate(iter_jsonl(cuts_path)):
            side = "dev" if int(hashes[i]) <= threshold else "train"
            (dev if side == "dev" else train).write(json.dumps(d) + "\n")
            counts[side][0] += 1
            counts[side][1] += duration_of(where, d)
        if counts["train"][0] == 0:
            raise EmptySplit(f"splitting {cuts_path} left train empty")
    summary = {
        "recordings": {"train": num_recordings - k, "dev": k},
        "cuts": {s: c[0] for s, c in counts.items()},
        "hours": {s: round(c[1] / 3600, 3) for s, c in counts.items()},
        "dev_fraction": dev_fraction, "seed": seed,
        "train": str(out_dir / "train.jsonl.gz"), "dev": str(out_dir / "dev.jsonl.gz"),
    }
    write_text(out_dir / "split.json", json.dumps(summary, indent=1))
    return summary
