"""HuBERT-style k-means targets: fit k-means on a seeded sample of the cuts' frames, label every cut.

  python prepare.py kmeans CUTS OUT_DIR --features mfcc --clusters 100 [--sample-fraction 0.1] [--jobs N]
  python prepare.py kmeans CUTS OUT_DIR --features encoder --checkpoint CKPT --layer 6 --clusters 500
  python prepare.py kmeans CUTS OUT_DIR --model kmeans.pt      # label new cuts with an existing fit
(also ``python -m nest.kmeans ...`` with the same arguments)

OUT_DIR gets ``cuts.jsonl.gz`` (each cut carries its labels as a TemporalArray ``targets`` of shape
(T', R) in ``targets-<time>.h5``, and ``targets_num_classes``), ``kmeans.pt`` (centroids and the feature recipe),
``summary.json`` and ``rejected.jsonl``. Features and label layout: nest/kmeans/features.py. The fit is
fairseq's learn_kmeans.py: scikit-learn's MiniBatchKMeans with its parameters.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from cuts.console import HelpFormatter, configure_logging, one_line
from cuts.lock import FolderBusy
from cuts.prepare import NothingUsable
from cuts.workers import Terminated, sigterm_raises
from nest.errors import ConfigError, FeatureError
from nest.kmeans.label import run_kmeans


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``kmeans`` on an argparse subparsers object (prepare.py kmeans ...)."""
    p = subparsers.add_parser("kmeans", help="HuBERT-style k-means targets: fit on a sample, label every cut",
                              description=__doc__, formatter_class=HelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=cmd_kmeans)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cuts", help="CutSet manifest (cuts.jsonl.gz)")
    p.add_argument("out", help="output folder")
    p.add_argument("--features", choices=["mfcc", "encoder"], default=None, help="default: mfcc (or --model's)")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default 100)")
    p.add_argument("--sample-fraction", type=float, default=0.1, help="share of cuts whose frames the fit sees")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes computing features and labels, and threads of the k-means fit")
    p.add_argument("--checkpoint", default=None, help="our checkpoint or a .nemo file (--features encoder)")
    p.add_argument("--layer", type=int, default=None,
                   help="encoder layer from 0 (first Conformer block's output; negative from the end)")
    p.add_argument("--model", default=None, help="kmeans.pt of an earlier fit: label only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device of the encoder (--features encoder)")
    p.add_argument("--config", default=None, help="model YAML whose token rate MFCC labels follow (default: ours)")


def cmd_kmeans(args) -> dict:
    return run_kmeans(args.cuts, args.out, features=args.features or (None if args.model else "mfcc"),
                      clusters=args.clusters, sample_fraction=args.sample_fraction, jobs=args.jobs,
                      checkpoint=args.checkpoint, layer=args.layer, model_path=args.model, seed=args.seed,
                      device=args.device, config=args.config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nest.kmeans", description=__doc__,
                                 formatter_class=HelpFormatter)
    _add_arguments(ap)
    args = ap.parse_args(argv)
    configure_logging()
    try:
        with sigterm_raises():
            summary = cmd_kmeans(args)
    except (FeatureError, ConfigError, NothingUsable, FolderBusy, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (Terminated, KeyboardInterrupt) as e:
        print(f"kmeans: {e or 'interrupted'}; its output folder is left as it was before", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    print(json.dumps(summary, indent=1))
    return 0
