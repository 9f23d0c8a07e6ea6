#!/usr/bin/env python
"""Build what training reads: CutSets, noise sets, duration bins (and later Shar, batch sizes).

  python prepare.py audio-dir SRC_DIR OUT_DIR [--channel first|mix] [--min-duration S] [--window S]
  python prepare.py bins CUTS.jsonl.gz --buckets 30 --out bins.yaml
"""
import sys

from cuts.cli import main

if __name__ == "__main__":
    sys.exit(main())
