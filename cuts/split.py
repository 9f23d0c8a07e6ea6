"""Split a CutSet into train and dev by recording, lazily: python -m cuts.split CUTS OUT_DIR --dev-cuts N

Every cut of a recording goes to the same side (windows of one recording never straddle the split);
the first recordings, in a seeded hash order, that give ``--dev-cuts`` cuts form dev.
"""
import argparse
import hashlib
import sys
from pathlib import Path

from lhotse import CutSet


def to_dev(recording_id: str, fraction: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{recording_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("cuts")
    ap.add_argument("out_dir")
    ap.add_argument("--dev-cuts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    total = sum(1 for _ in CutSet.from_jsonl_lazy(args.cuts))
    fraction = min(1.0, args.dev_cuts / max(total, 1))
    with CutSet.open_writer(out / "train.jsonl.gz", overwrite=True) as train, \
            CutSet.open_writer(out / "dev.jsonl.gz", overwrite=True) as dev:
        for cut in CutSet.from_jsonl_lazy(args.cuts):
            (dev if to_dev(cut.recording.id, fraction, args.seed) else train).write(cut)
    print(f"{total} cuts split into {out / 'train.jsonl.gz'} and {out / 'dev.jsonl.gz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
