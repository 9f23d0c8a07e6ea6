"""Command line of prepare.py: one subcommand per kind of input or product."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from cuts.bins import MIN_BATCHES_PER_BUCKET, MIN_CUTS_PER_BUCKET, manifest_durations, plot_bins
from cuts.config import DataConfig
from cuts.console import HelpFormatter, configure_logging, one_line
from cuts.lock import FolderBusy
from cuts.prepare import NothingUsable, prepare_audio_dir
from cuts.sources import RECIPES, SHAR_AUDIO_FORMATS, export_shar, prepare_lhotse_manifest, prepare_nemo_manifests, prepare_recipe
from cuts.workers import Terminated, sigterm_raises


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def cmd_audio_dir(args) -> dict:
    return prepare_audio_dir(Path(args.src), Path(args.out), **set_options(args))


def set_options(args) -> dict:
    return dict(channel=args.channel, min_duration=args.min_duration, max_duration=args.max_duration,
                window=args.window, jobs=args.jobs, seed=args.seed)


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
    """A noise set from a folder, NeMo manifests (.json) or Lhotse manifests, by what SRC is."""
    srcs = [Path(s) for s in args.src]
    missing = [str(s) for s in srcs if not s.exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} does not exist: give a noise folder or manifest that does")
    if len(srcs) == 1 and srcs[0].is_dir():
        return prepare_audio_dir(srcs[0], Path(args.out), **set_options(args))
    if all(s.name.endswith((".jsonl.gz", ".jsonl")) for s in srcs):
        return prepare_lhotse_manifest(srcs, Path(args.out), **set_options(args))
    if all(s.suffix == ".json" for s in srcs):
        return prepare_nemo_manifests(srcs, Path(args.out), **set_options(args))
    raise FileNotFoundError(f"{' '.join(map(str, srcs))}: give one folder, NeMo manifests (.json) or Lhotse "
                            "manifests (.jsonl.gz)")


def cmd_shar(args) -> dict:
    return export_shar(Path(args.cuts), Path(args.out), shard_size=args.shard_size, seed=args.seed,
                       audio_format=args.audio_format)


def cmd_split(args) -> dict:
    from cuts.split import split_cuts

    return split_cuts(Path(args.cuts), Path(args.out_dir), args.dev_fraction, seed=args.seed)


def cut_durations(source: str):
    """Durations of a CutSet manifest (read without building cuts) or of a Shar folder, in stored order."""
    import numpy as np

    if Path(source).is_dir():
        from cuts.sampler import open_cuts

        return np.fromiter((c.duration for c in open_cuts(source, seed=0)), dtype=np.float64)
    if not Path(source).is_file():
        raise FileNotFoundError(f"{source} does not exist: give a CutSet manifest (.jsonl.gz) or a Shar folder")
    return manifest_durations(Path(source))


def data_settings(args) -> DataConfig:
    """The data section training runs with: the defaults, or --config with key=value (where nest-prepare adds
    them), then the command's own flags given."""
    if getattr(args, "config", None) or getattr(args, "overrides", None):
        cfg = args.read_data_config(args.config, args.overrides)
    else:
        cfg = DataConfig()
    for name in ("batch_duration", "min_duration", "max_duration"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    if getattr(args, "no_drop_last", False):
        cfg.drop_last = False
    return cfg


def cmd_report(args) -> dict:
    from cuts.report import bucket_report, format_table, load_uppers_and_sizes, plot_report

    cfg = data_settings(args)
    sizes_path = args.batch_sizes or (None if args.bins else cfg.bucket_batch_size)
    bins_path = args.bins or cfg.bins
    uppers, sizes = load_uppers_and_sizes(bins_path, sizes_path)
    durations = cut_durations(args.cuts)
    rows = bucket_report(durations, uppers, sizes, cfg.batch_duration, args.seed, world_size=args.world_size,
                         drop_last=cfg.drop_last, min_duration=cfg.min_duration, max_duration=cfg.max_duration,
                         quadratic_duration=cfg.quadratic_duration)
    print(format_table(rows, args.world_size), file=sys.stderr)
    png = Path(args.png or Path(sizes_path or bins_path).with_suffix(".report.png"))
    plot_report(rows, png)
    used = sum(r["cuts"] for r in rows)
    return {"png": str(png), "steps_per_epoch": sum(r["steps_per_epoch"] for r in rows), "world_size": args.world_size,
            "cuts": used, "cuts_outside_duration_range": int(len(durations) - used),
            "buckets_never_filling": [r["bucket"] for r in rows if r["never_fills"]]}


def cmd_bins(args) -> dict:
    from cuts.report import training_bins

    durations = cut_durations(args.cuts)
    if not len(durations):
        raise ValueError(f"{args.cuts} holds no cuts: prepare a set first (prepare.py audio-dir ...)")
    bins, info = training_bins(durations, data_settings(args), args.buckets, args.min_cuts_per_bucket,
                               args.min_batches_per_bucket, args.seed)
    out = Path(args.out)
    bins.save(out)
    if not args.no_plot:
        plot_bins(durations, bins, out.with_suffix(".png"))
    return {**info, "asked": args.buckets, "max_duration": bins.max_duration, "bins": str(out),
            "png": None if args.no_plot else str(out.with_suffix(".png"))}


def cmd_synth(args) -> dict:
    from cuts.synth import synthesize_corpus

    return synthesize_corpus(Path(args.out), num_utterances=args.num_utterances, num_noises=args.num_noises,
                             seed=args.seed)


def add_set_options(p: argparse.ArgumentParser, window: float | None) -> None:
    p.add_argument("--channel", choices=["first", "mix"], default="first", help="multi-channel files")
    p.add_argument("--min-duration", type=float, default=0.1, help="shorter files are rejected (s)")
    p.add_argument("--max-duration", type=float, default=None, help="longer cuts are rejected (s)")
    p.add_argument("--window", type=float, default=window, help="cut long recordings into windows (s)")
    p.add_argument("--jobs", type=int, default=1, help="processes checking audio files")
    p.add_argument("--seed", type=int, default=0, help="of the shuffled order of cuts.jsonl.gz")


def parser(extra: Sequence[Callable] = ()) -> argparse.ArgumentParser:
    """prepare.py's commands on data; ``extra`` register more (``add_parser(subparsers)`` functions)."""
    ap = argparse.ArgumentParser(prog="prepare.py", description="Build CutSets, noise sets, bins, batch sizes and "
                                 "targets for NEST.")
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
    p = sub.add_parser("noise", help="a noise set (10 s windows) from a folder, NeMo or Lhotse manifests")
    p.add_argument("src", nargs="+")
    p.add_argument("out")
    add_set_options(p, window=10.0)
    p.set_defaults(func=cmd_noise)
    p = sub.add_parser("shar", help="export a CutSet with its audio as Lhotse Shar shards, shuffled")
    p.add_argument("cuts")
    p.add_argument("out")
    p.add_argument("--shard-size", type=int, default=1000, help="cuts per shard")
    p.add_argument("--audio-format", default="flac", choices=SHAR_AUDIO_FORMATS,
                   help="flac: half the bytes of wav; wav: no decoding, several times more audio per worker "
                        "(BENCHMARKS.md); mp3, opus: lossy")
    p.add_argument("--seed", type=int, default=0, help="of the shuffled order")
    p.set_defaults(func=cmd_shar)
    p = sub.add_parser("split", help="a CutSet -> train.jsonl.gz + dev.jsonl.gz, split by recording")
    p.add_argument("cuts")
    p.add_argument("out_dir")
    p.add_argument("--dev-fraction", type=float, default=0.01,
                   help="share of recordings for dev (at least 1, at most half; train keeps the rest)")
    p.add_argument("--seed", type=int, default=0, help="of the choice of dev recordings")
    p.set_defaults(func=cmd_split)
    p = sub.add_parser("bins", help="duration buckets for the training sampler (bins.yaml and a histogram PNG)",
                       description="Duration buckets of the cuts training keeps, each holding several batches of "
                       "data.batch_duration: the settings come from --config and key=value (as given to nest-train), "
                       "else the defaults, and the flags below override them.")
    p.add_argument("cuts", help="CutSet manifest or Shar folder")
    p.add_argument("--buckets", type=int, default=30, help="at most this many buckets")
    p.add_argument("--min-cuts-per-bucket", type=int, default=MIN_CUTS_PER_BUCKET,
                   help="fewer buckets when the data cannot give each this many cuts")
    p.add_argument("--min-batches-per-bucket", type=float, default=MIN_BATCHES_PER_BUCKET,
                   help="fewer buckets when the data cannot give each this many batches of audio")
    p.add_argument("--batch-duration", type=float, default=None, help="data.batch_duration (s)")
    p.add_argument("--min-duration", type=float, default=None, help="data.min_duration (s)")
    p.add_argument("--max-duration", type=float, default=None, help="data.max_duration (s)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (for the steps per epoch)")
    p.add_argument("--out", required=True)
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_bins)
    p = sub.add_parser("report", help="per-bucket cuts, hours, batch size, padding, steps per epoch as the "
                                      "training sampler batches (table + PNG)",
                       description="The settings come from --config and key=value (as given to nest-train), else "
                       "the defaults, and the flags below override them.")
    p.add_argument("cuts", help="CutSet manifest or Shar folder")
    p.add_argument("--bins", help="bins.yaml (default: data.bins)")
    p.add_argument("--batch-sizes", help="batch_sizes.yaml from calibrate (carries its own bucket bounds; default: "
                                         "data.bucket_batch_size)")
    p.add_argument("--batch-duration", type=float, default=None, help="data.batch_duration (s)")
    p.add_argument("--min-duration", type=float, default=None, help="data.min_duration (s)")
    p.add_argument("--max-duration", type=float, default=None, help="data.max_duration (s)")
    p.add_argument("--no-drop-last", action="store_true", help="as data.drop_last=false")
    p.add_argument("--world-size", type=int, default=1, help="number of training processes (GPUs x nodes)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--png", default=None)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("synth", help="a small synthetic speech-like corpus and noise set (for the demo)")
    p.add_argument("out")
    p.add_argument("--num-utterances", type=int, default=240)
    p.add_argument("--num-noises", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    for add in extra:
        add(sub)
    for p in sub.choices.values():  # every command's --help shows its defaults
        p.formatter_class = HelpFormatter
    return ap


def main(argv=None, extra: Sequence[Callable] = ()) -> int:
    """Run one command; errors about the input (ValueError, OSError, nothing usable, a busy output folder) print one
    line and exit 1; SIGTERM and Ctrl-C stop it cleanly (temporary files and worker processes removed)."""
    ap = parser(extra)
    args, unknown = ap.parse_known_args(argv)
    # key=value anywhere on the line, as nest-train takes them (argparse binds positionals only where they start)
    if unknown and isinstance(getattr(args, "overrides", None), list) and all(OVERRIDE.match(u) for u in unknown):
        args.overrides += unknown
    elif unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging()
    try:
        with sigterm_raises():
            result = args.func(args)
    except (NothingUsable, FolderBusy, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (Terminated, KeyboardInterrupt) as e:
        print(f"{args.command}: {e or 'interrupted'}; what it was writing is left as it was before", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    print(json.dumps(result, indent=1))
    return 0
