"""Command line of prepare.py: one subcommand per kind of input or product."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lhotse import CutSet

from cuts.bins import Bins, estimate_bins, plot_bins
from cuts.prepare import NothingUsable, prepare_audio_dir
from cuts.sources import RECIPES, export_shar, prepare_lhotse_manifest, prepare_nemo_manifests, prepare_recipe


def cmd_audio_dir(args) -> dict:
    return prepare_audio_dir(Path(args.src), Path(args.out), **set_options(args))


def set_options(args) -> dict:
    return dict(channel=args.channel, min_duration=args.min_duration, max_duration=args.max_duration,
                window=args.window, jobs=args.jobs)


def cmd_nemo_manifest(args) -> dict:
    return prepare_nemo_manifests([Path(m) for m in args.manifests], Path(args.out), **set_options(args))


def cmd_manifest(args) -> dict:
    return prepare_lhotse_manifest([Path(m) for m in args.manifests], Path(args.out), **set_options(args))


def cmd_recipe(args) -> dict:
    opts = set_options(args)
    del opts["channel"]
    return prepare_recipe(args.corpus, Path(args.corpus_dir), Path(args.out), download=args.download,
                          parts=args.parts, **opts)


def cmd_noise(args) -> dict:
    """A noise set from a folder, a NeMo manifest (.json) or a Lhotse manifest, by what SRC is."""
    src = Path(args.src)
    if src.is_dir():
        return prepare_audio_dir(src, Path(args.out), **set_options(args))
    if src.name.endswith((".jsonl.gz", ".jsonl")) and not src.name.endswith(".json"):
        return prepare_lhotse_manifest([src], Path(args.out), **set_options(args))
    if src.suffix == ".json":
        return prepare_nemo_manifests([src], Path(args.out), **set_options(args))
    raise FileNotFoundError(f"{src}: give a folder, a NeMo manifest (.json) or a Lhotse manifest (.jsonl.gz)")


def cmd_shar(args) -> dict:
    return export_shar(Path(args.cuts), Path(args.out), shard_size=args.shard_size)


def cmd_calibrate(args) -> dict:
    from nest.calibrate import run_calibration
    from nest.config import load_config

    cfg = load_config(args.config, args.overrides)
    uppers = Bins.load(args.bins).upper
    results = run_calibration(
        cfg.model, uppers, args.out, memory_fraction=args.memory_fraction, memory_budget_gib=args.memory_budget_gib,
        precision=args.precision, gap=args.gap, ddp_allowance=not args.no_ddp_allowance, device=args.device,
    )
    return {"out": args.out, "buckets": [{"upper_s": r.upper, "batch_size": r.batch_size,
                                          "peak_gib": round(r.peak_bytes / 2**30, 3)} for r in results]}


def cmd_report(args) -> dict:
    import numpy as np

    from cuts.report import bucket_report, format_table, load_uppers_and_sizes, plot_report

    uppers, sizes = load_uppers_and_sizes(args.bins, args.batch_sizes)
    durations = np.fromiter((c.duration for c in CutSet.from_jsonl_lazy(args.cuts)), dtype=np.float64)
    rows = bucket_report(durations[durations <= uppers[-1]], uppers, sizes, args.batch_duration)
    print(format_table(rows), file=sys.stderr)
    png = Path(args.png or Path(args.batch_sizes or args.bins).with_suffix(".report.png"))
    plot_report(rows, png)
    return {"png": str(png), "left_out_longer_than_last_bucket": int((durations > uppers[-1]).sum())}


def cmd_bins(args) -> dict:
    cuts = CutSet.from_jsonl_lazy(args.cuts) if str(args.cuts).endswith((".jsonl", ".jsonl.gz")) \
        else CutSet.from_file(args.cuts)
    bins, durations = estimate_bins(cuts, args.buckets)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bins.save(out)
    if not args.no_plot:
        plot_bins(durations, bins, out.with_suffix(".png"))
    return {"num_buckets": len(bins.upper), "num_cuts": bins.num_cuts, "bins": str(out)}


def cmd_synth(args) -> dict:
    from cuts.synth import synthesize_corpus

    return synthesize_corpus(Path(args.out), num_utterances=args.num_utterances, num_noises=args.num_noises,
                             seed=args.seed)


def add_set_options(p: argparse.ArgumentParser, window: float | None) -> None:
    p.add_argument("--channel", choices=["first", "mix"], default="first", help="multi-channel files")
    p.add_argument("--min-duration", type=float, default=0.1, help="shorter files are rejected (s)")
    p.add_argument("--max-duration", type=float, default=None, help="longer cuts are rejected (s)")
    p.add_argument("--window", type=float, default=window, help="cut long recordings into windows (s)")
    p.add_argument("--jobs", type=int, default=1, help="processes reading audio headers")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prepare.py", description="Build CutSets, noise sets and bins for NEST.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("audio-dir", help="a folder tree of audio files -> CutSet")
    p.add_argument("src")
    p.add_argument("out")
    add_set_options(p, window=None)
    p.set_defaults(func=cmd_audio_dir)
    p = sub.add_parser("nemo-manifest", help="NeMo JSON-lines manifests -> CutSet")
    p.add_argument("manifests", nargs="+")
    p.add_argument("out")
    add_set_options(p, window=None)
    p.set_defaults(func=cmd_nemo_manifest)
    p = sub.add_parser("manifest", help="existing Lhotse CutSet or RecordingSet manifests -> checked CutSet")
    p.add_argument("manifests", nargs="+")
    p.add_argument("out")
    add_set_options(p, window=None)
    p.set_defaults(func=cmd_manifest)
    p = sub.add_parser("recipe", help=f"a corpus through Lhotse's recipe: {', '.join(RECIPES)}")
    p.add_argument("corpus", choices=RECIPES)
    p.add_argument("corpus_dir")
    p.add_argument("out")
    p.add_argument("--download", action="store_true", help="download the corpus first (needs network)")
    p.add_argument("--parts", nargs="*", default=None, help="e.g. train-clean-100 dev-clean, or noise music")
    add_set_options(p, window=None)
    p.set_defaults(func=cmd_recipe)
    p = sub.add_parser("noise", help="a noise set (10 s windows) from a folder, NeMo or Lhotse manifest")
    p.add_argument("src")
    p.add_argument("out")
    add_set_options(p, window=10.0)
    p.set_defaults(func=cmd_noise)
    p = sub.add_parser("shar", help="export a CutSet with its audio (flac) as Lhotse Shar shards")
    p.add_argument("cuts")
    p.add_argument("out")
    p.add_argument("--shard-size", type=int, default=1000)
    p.set_defaults(func=cmd_shar)
    p = sub.add_parser("bins", help="duration bins for bucketing (bins.yaml and a histogram PNG)")
    p.add_argument("cuts")
    p.add_argument("--buckets", type=int, default=30)
    p.add_argument("--out", required=True)
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_bins)
    p = sub.add_parser("calibrate", help="per-bucket batch sizes that fill accelerator memory")
    p.add_argument("--config", required=True)
    p.add_argument("--bins", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--memory-fraction", type=float, default=0.9, help="of the GPU's memory")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="an absolute budget (needed on CPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on GPU")
    p.add_argument("--gap", type=float, default=0.05, help="stop when the search bracket is this tight (relative)")
    p.add_argument("--no-ddp-allowance", action="store_true", help="single device: keep no room for DDP buckets")
    p.add_argument("--device", default=None)
    p.add_argument("overrides", nargs="*", help="config key=value")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("report", help="per-bucket cuts, hours, batch size, padding, steps (table + PNG)")
    p.add_argument("cuts")
    p.add_argument("--bins")
    p.add_argument("--batch-sizes")
    p.add_argument("--batch-duration", type=float, default=600.0, help="without --batch-sizes")
    p.add_argument("--png", default=None)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("synth", help="a small synthetic speech-like corpus and noise set (for the demo)")
    p.add_argument("out")
    p.add_argument("--num-utterances", type=int, default=240)
    p.add_argument("--num-noises", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except (NothingUsable, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0
