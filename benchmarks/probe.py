"""Does NEST pretraining help? Spoken-word classification on held-out voices; prints one JSON object.

  python benchmarks/probe.py [--work DIR] [--seeds 0 1 2] [--steps 600] [--config configs/nest_tiny.yaml]

Offline task (needs espeak-ng: ``apt-get install -y espeak-ng``): 20 words (Speech Commands' ten and the
digits) said by synthetic voices (espeak-ng accent x voice variant x pitch x speed), in real noise from
``../shared/data/real/noise``. Three disjoint sets of voice variants: the probe's train voices, its dev
voices and the pretraining voices, which read sentences of other words (no target word, no homophone).
Rows, each with the same probe (``nest.probe``: all layers, weighted sum, mean pooling, small MLP) and
budget, over 3 seeds: ``mel`` (mean-pooled log-mel), ``random_init`` (the encoder at the initialisation
that pretraining with that seed starts from), ``nest`` (after ``train.py`` on the pretraining speech) and
``kmeans`` (the same training on k-means targets of MFCC frames, HuBERT's first iteration; only where
``model.targets=kmeans`` and ``nest.kmeans`` exist) and, when asked with ``--rows``, ``w2vbert`` (the
Wav2vec-BERT objective of ``--w2vbert-config`` on the same speech).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.probe_corpora import FSDD, build_corpus, build_fsdd  # noqa: E402
# Masks of 160 ms (16 frames, about 40% of frames) instead of NeMo's 400 ms: see BENCHMARKS.md (issue 14).
TRAIN_OVERRIDES = ("model.masking.block_size=16", "model.masking.mask_prob=0.03", "data.batch_duration=20")
# The w2vbert row: 160 ms time patches, as NEST's masks above, and the same share of frames masked.
# Without the contrastive term at this budget (issue 24: it costs the probe; BENCHMARKS.md).
W2VBERT_OVERRIDES = ("model.w2vbert.patch_size=16", "model.w2vbert.contrastive_alpha=0")
# The nest_norm row: NEST with a LayerNorm before the random projection (issue 24; NeMo's open PR #15589).
NEST_NORM_OVERRIDES = ("model.quantizer.norm=layer",)
# FSDD's cuts last 0.14-1.31 s (mean 0.47 s): keep them all (the configs drop cuts under 0.5 s).
TASK_OVERRIDES = {"espeak": (), "fsdd": ("data.min_duration=0.1",)}

def kmeans_available() -> str | None:
    """None when k-means targets can be trained in this checkout (issue 13), else why not."""
    import importlib.util

    from nest.objectives import ModelConfig

    if "targets" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        return "model.targets does not exist in this checkout (issue 13)"
    if importlib.util.find_spec("nest.kmeans") is None:
        return "nest.kmeans does not exist in this checkout (issue 13)"
    return None


def run(cmd: list[str], log: Path, threads: int) -> tuple[float, float]:
    """Run a command from the project root with ``threads`` torch threads, output into ``log``; its wall and
    CPU seconds (its own rusage, exact also when several run at once)."""
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime


def pretrain(work: Path, corpus: dict, args, seed: int, row: str, extra: tuple = (), config: str = "") -> dict:
    """train.py on the pretraining speech; returns the checkpoint, its summary and the seconds taken.

    A run already finished with the same settings (same folder name) is reused.
    """
    overrides = [f"data.train_cuts=[{corpus['pretrain']}]", f"data.noise_cuts=[{corpus['noise']}]",
                 f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every_n_steps={args.steps}",
                 "trainer.enable_progress_bar=false", *args.train_overrides, *TASK_OVERRIDES[args.task], *extra]
    config = config or args.config
    tag = hashlib.sha256(json.dumps([config, overrides]).encode()).hexdigest()[:8]  # the settings, not the seed
    overrides.append(f"seed={seed}")
    exp = work / f"{row}-{tag}-seed{seed}"
    seconds = cpu = 0.0
    if not (exp / "summary.json").is_file():
        seconds, cpu = run([sys.executable, "train.py", "--config", config, *overrides, f"exp_dir={exp}"],
                           exp.with_suffix(".log"), args.train_threads)
        (exp / "cpu_seconds.json").write_text(json.dumps({"wall": seconds, "cpu": cpu}))
    elif (exp / "cpu_seconds.json").is_file():  # reused: the CPU time it took when it ran
        cpu = json.loads((exp / "cpu_seconds.json").read_text())["cpu"]
    summary = json.loads((exp / "summary.json").read_text())
    return {"row": row, "seed": seed, "checkpoint": str(exp / "checkpoints" / "last.ckpt"), "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu, 1), **summary}


def kmeans_corpus(work: Path, corpus: dict, args) -> tuple[dict, tuple]:
    """Issue 13's first HuBERT iteration: the pretraining cuts labelled with k-means of MFCC frames; returns
    the labelled corpus and the train.py overrides that read its labels."""
    km = Path(corpus["folder"]) / f"kmeans-{args.kmeans_clusters}"  # beside the corpus it labels
    if not (km / "summary.json").is_file():
        run([sys.executable, "-m", "nest.kmeans", corpus["pretrain"], str(km), "--features", "mfcc",
             "--clusters", str(args.kmeans_clusters), "--sample-fraction", "0.5", "--jobs", str(args.jobs),
             "--config", args.config], work / "kmeans-prepare.log", args.train_threads)
    books = json.loads((km / "summary.json").read_text())["labels_per_token"]  # 10 ms labels per 80 ms token
    extra = ("model.targets=kmeans", f"model.quantizer.num_classes={args.kmeans_clusters}",
             f"model.quantizer.num_books={books}")
    return {**corpus, "pretrain": str(km / "cuts.jsonl.gz")}, extra


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation over seeds, with the runs."""
    return {"mean": round(statistics.mean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1
            else 0.0, "runs": [round(v, 4) for v in values]}


def probe_folds(spec: str, corpus: dict, seed: int, work: Path, row: str, epochs: int) -> dict:
    """The probe of one source and seed on every fold of the task (one for espeak, one per held-out speaker for
    FSDD): accuracy, loss and layer weights averaged over the folds, each fold's accuracy. Folds that hold out each
    speaker in turn cover the same cuts: the encoder runs once (on the first fold's two sides) for all of them."""
    from nest.config.load import open_manifest
    from nest.probe import FeatureSet, run_probe
    from nest.probe.features import features_for, read_labels
    from nest.probe.head import plot, train_probe

    folds = corpus.get("folds") or {"voices": {"train": corpus["train"], "dev": corpus["dev"]}}
    if len(folds) == 1:
        rs = {name: run_probe(spec, f["train"], f["dev"], corpus["label"], epochs=epochs, seed=seed,
                              cache=work / "cache", out=work / "probe" / f"{row}-seed{seed}")
              for name, f in folds.items()}
    else:
        first = next(iter(folds.values()))
        labels = {s: read_labels(open_manifest(first[s], s), corpus["label"], first[s]) for s in ("train", "dev")}
        feats, _ = features_for(spec, seed, {s: first[s] for s in ("train", "dev")}, labels, "all", 8,
                                torch.device("cpu"), work / "cache")
        pooled = {i: x for fs in feats.values() for i, x in zip(fs.ids, fs.pooled)}
        label = {**labels["train"], **labels["dev"]}
        layers = feats["train"].layers
        rs = {}
        for name, f in folds.items():
            sets = {}
            for side in ("train", "dev"):
                ids = [c.id for c in open_manifest(f[side], side) if c.id in pooled]
                sets[side] = FeatureSet(ids, [label[i] for i in ids], torch.stack([pooled[i] for i in ids]), layers)
            classes = sorted(set(sets["train"].labels))
            r = {"checkpoint": spec, "label": corpus["label"], "layers": layers,
                 **train_probe(sets["train"], sets["dev"], classes, epochs, seed)}
            r["majority_baseline"] = max(sets["dev"].labels.count(c) for c in classes) / len(sets["dev"].ids)
            r["num_classes"] = len(classes)
            out = work / "probe" / f"{row}-seed{seed}-{name}"
            out.mkdir(parents=True, exist_ok=True)
            r["png"] = str(out / "probe.png")
            plot(r, classes, out / "probe.png")
            (out / "probe.json").write_text(json.dumps(r, indent=1))
            rs[name] = r
    first = next(iter(rs.values()))
    return {"accuracy": float(np.mean([r["accuracy"] for r in rs.values()])),
            "loss": float(np.mean([r["loss"] for r in rs.values()])),
            "train_accuracy": float(np.mean([r["train_accuracy"] for r in rs.values()])),
            "layer_weights": np.mean([r["layer_weights"] for r in rs.values()], 0).tolist(),
            "majority_baseline": float(np.mean([r["majority_baseline"] for r in rs.values()])),
            "num_classes": first["num_classes"], "png": first["png"],
            "folds": {name: round(r["accuracy"], 4) for name, r in rs.items()}}


def plot_summary(acc: dict, weights: dict, baseline: float, title: str, path: Path) -> None:
    """Accuracy per row (seeds as dots, mean and std as a bar) beside the mean layer weights per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    rows = list(acc)
    a.bar(rows, [acc[r]["mean"] for r in rows], yerr=[acc[r]["std"] for r in rows], capsize=4, color="#9ecae1")
    for i, r in enumerate(rows):
        a.plot([i] * len(acc[r]["runs"]), acc[r]["runs"], "k.", ms=8)
    a.axhline(baseline, color="gray", ls="--", lw=1, label="majority class")
    a.set(ylabel="dev accuracy", title=title)
    a.legend()
    encoders = [r for r in rows if len(weights[r]) > 1]
    width = 0.8 / max(1, len(encoders))
    for k, r in enumerate(encoders):
        b.bar(np.arange(len(weights[r])) + k * width, weights[r], width, label=r)
    layers = max((len(weights[r]) for r in encoders), default=0)
    b.set_xticks(np.arange(layers) + width * (len(encoders) - 1) / 2, [str(i) for i in range(layers)])
    b.set(xlabel="encoder layer (0: first block)", ylabel="weight (softmax, mean over seeds)",
          title="which layers the probe uses")
    if encoders:
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (train.py runs, espeak-ng)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["espeak", "fsdd"], default="espeak",
                    help="espeak: synthetic words in real noise; fsdd: real recorded digits, one speaker held out")
    ap.add_argument("--work", default=None, help="corpus, checkpoints, caches (reused when present); default "
                    "exp/bench_probe (espeak), exp/bench_probe_fsdd (fsdd)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="configs/nest_tiny.yaml")
    ap.add_argument("--steps", type=int, default=800, help="pretraining steps per seed")
    ap.add_argument("--train-overrides", nargs="*", default=list(TRAIN_OVERRIDES), help="key=value for train.py")
    ap.add_argument("--parallel", type=int, default=3, help="pretraining runs at once")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads per pretraining run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the probes (this process)")
    ap.add_argument("--epochs", type=int, default=40, help="probe epochs")
    ap.add_argument("--train-voices", type=int, default=32)
    ap.add_argument("--train-reps", type=int, default=1, help="renditions of each word per train voice")
    ap.add_argument("--dev-voices", type=int, default=12)
    ap.add_argument("--pretrain-voices", type=int, default=56)
    ap.add_argument("--pretrain-utterances", type=int, default=1200)
    ap.add_argument("--sentence-words", type=int, nargs=2, default=[5, 14])
    ap.add_argument("--snr", type=float, nargs=2, default=[5.0, 25.0], help="dB, probe utterances in real noise")
    ap.add_argument("--kmeans-clusters", type=int, default=100)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--fsdd", default=str(FSDD), help="the Free Spoken Digit Dataset folder (recordings/*.wav)")
    ap.add_argument("--fsdd-dev-speaker", default="all", help="the speaker the probe is scored on, trained on the "
                    "others; all: each speaker in turn (accuracy: the mean over these folds)")
    ap.add_argument("--fsdd-pretrain", choices=["all", "train-speakers"], default="all",
                    help="pretraining audio: every recording (labels unread), or the probe's train speakers only")
    ap.add_argument("--jobs", type=int, default=2, help="espeak-ng processes")
    ap.add_argument("--rows", nargs="+", default=["mel", "random_init", "nest", "kmeans"],
                    help="also: w2vbert (--w2vbert-config, 16-frame time patches), nest_norm (NEST with "
                    "model.quantizer.norm=layer)")
    ap.add_argument("--w2vbert-config", default="configs/w2vbert_tiny.yaml")
    args = ap.parse_args()
    if args.task == "espeak" and shutil.which("espeak-ng") is None:
        print("benchmarks/probe.py needs espeak-ng to synthesise speech offline: apt-get install -y espeak-ng "
              "(Debian/Ubuntu), brew install espeak-ng (macOS)", file=sys.stderr)
        return 2
    # On a shared machine one thread per process is several times faster than two that contend for cores.
    torch.set_num_threads(args.threads)
    work = Path(args.work or ("exp/bench_probe" if args.task == "espeak" else "exp/bench_probe_fsdd"))
    work = work if work.is_absolute() else ROOT / work
    work.mkdir(parents=True, exist_ok=True)
    load_start, wall = os.getloadavg(), {}
    t0 = t = time.perf_counter()
    if args.task == "espeak":
        settings = [args.data_seed, args.train_voices, args.train_reps, args.dev_voices, args.pretrain_voices,
                    args.pretrain_utterances, args.sentence_words, args.snr]
    else:
        settings = ["fsdd", str(Path(args.fsdd).resolve()), args.fsdd_dev_speaker, args.fsdd_pretrain]
    folder = work / f"corpus-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]}"
    if (folder / "corpus.json").is_file():
        corpus = json.loads((folder / "corpus.json").read_text())
    elif args.task == "espeak":
        corpus = build_corpus(folder, args)
    else:
        corpus = build_fsdd(folder, Path(args.fsdd), args.fsdd_dev_speaker, args.fsdd_pretrain)
    corpus["folder"] = str(folder)
    wall["corpus"] = round(time.perf_counter() - t, 1)
    kmeans_missing = kmeans_available() if "kmeans" in args.rows else "not asked for"
    rows = [r for r in args.rows if r != "kmeans" or kmeans_missing is None]

    t = time.perf_counter()
    jobs = [(corpus, seed, "nest", ()) for seed in args.seeds if "nest" in rows]
    jobs += [(corpus, seed, "nest_norm", NEST_NORM_OVERRIDES) for seed in args.seeds if "nest_norm" in rows]
    if "kmeans" in rows:
        kcorpus, extra = kmeans_corpus(work, corpus, args)
        jobs += [(kcorpus, seed, "kmeans", extra) for seed in args.seeds]
    jobs = [(*j, "") for j in jobs]
    if "w2vbert" in rows:  # issue 15's objective, its time patches as short as NEST's masks here
        jobs += [(corpus, seed, "w2vbert", W2VBERT_OVERRIDES, args.w2vbert_config) for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        trained = list(pool.map(lambda j: pretrain(work, j[0], args, j[1], j[2], j[3], j[4]), jobs))
    wall["pretraining"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    for seed in args.seeds:
        # mel through the config's own front end (its sample rate): the features every encoder row starts from
        specs = {"mel": f"mel:{args.config}", "random_init": f"random:{args.config}"}
        specs.update({i["row"]: i["checkpoint"] for i in trained if i["seed"] == seed})
        for row in rows:
            runs[row].append(probe_folds(specs[row], corpus, seed, work, row, args.epochs))
    wall["probes"] = round(time.perf_counter() - t, 1)
    wall["total"] = round(time.perf_counter() - t0, 1)

    acc = {row: spread([r["accuracy"] for r in rs]) for row, rs in runs.items()}
    weights = {row: np.mean([r["layer_weights"] for r in rs], 0).round(3).tolist() for row, rs in runs.items()}
    baseline = runs[rows[0]][0]["majority_baseline"]
    title = ("spoken words, held-out voices, real noise" if args.task == "espeak"
             else f"recorded digits, held-out speaker ({', '.join(corpus['summary']['dev_speakers'])})")
    plot_summary(acc, weights, baseline, title, work / "summary.png")
    result = {
        "accuracy": acc,
        "dev_loss": {row: spread([r["loss"] for r in rs]) for row, rs in runs.items()},
        "train_accuracy": {row: spread([r["train_accuracy"] for r in rs]) for row, rs in runs.items()},
        "fold_accuracy": {row: {name: spread([r["folds"][name] for r in rs]) for name in rs[0]["folds"]}
                          for row, rs in runs.items()},
        "layer_weights": weights,
        "task": {"name": args.task, **corpus["summary"], "label": corpus["label"], "classes": runs[rows[0]][0]["num_classes"],
                 "majority_baseline": round(baseline, 4)},
        "pretraining": {row: {"config": args.w2vbert_config if row == "w2vbert" else args.config, "steps": args.steps,
                              "overrides": [*args.train_overrides, *TASK_OVERRIDES[args.task],
                                            *{"w2vbert": W2VBERT_OVERRIDES, "nest_norm": NEST_NORM_OVERRIDES}.get(row, ())],
                              "first_loss": [round(i["first_loss"], 3) for i in infos],
                              "last_loss": [round(i["last_loss"], 3) for i in infos],
                              "audio_hours_seen": round(infos[0]["audio_hours_seen"], 2),
                              "seconds": [i["seconds"] for i in infos],
                              "cpu_seconds": [i["cpu_seconds"] for i in infos]}
                        for row in ("nest", "nest_norm", "kmeans", "w2vbert") if (infos := [i for i in trained if i["row"] == row])},
        "probe": {"epochs": args.epochs, "layers": "all", "seeds": args.seeds, "std": "sample std over seeds"},
        "wall_seconds": wall,
        "cpu_seconds": round(cpu_seconds(), 1),
        "load_average": {"start": round(load_start[0], 1), "end": round(os.getloadavg()[0], 1)},
        "pictures": {"summary": str(work / "summary.png"), **{row: rs[0]["png"] for row, rs in runs.items()}},
        "machine": machine(),
        "date": date.today().isoformat(),
    }
    if "nest" in acc and "random_init" in acc:
        result["nest_minus_random_init"] = round(acc["nest"]["mean"] - acc["random_init"]["mean"], 4)
    if kmeans_missing is not None and "kmeans" in args.rows:
        result["kmeans_skipped"] = kmeans_missing
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
