#!/usr/bin/env python
"""Build what training reads: CutSets, noise sets, duration bins, Shar shards, batch sizes, k-means targets.

  python prepare.py audio-dir SRC_DIR OUT_DIR          # one command per kind of input; --help lists them
  python prepare.py bins OUT_DIR/train.jsonl.gz --out bins.yaml
"""
import sys

from nest.prepare_cli import main

if __name__ == "__main__":
    sys.exit(main())
