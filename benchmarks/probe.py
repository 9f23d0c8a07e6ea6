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
import soundfile as sf
import torch
import torchaudio
from lhotse import CutSet, Recording, SupervisionSegment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_NOISE = ROOT.parent / "shared" / "data" / "real" / "noise"
SR = 16000

WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Pretraining text: none of WORDS, nor a homophone of one (know, write, won, to, too, for, ate, ...).
FILLER = """the a an and but or if then when where why how what who which this that these those here there
is are was were be been being have has had do does did will would can could should may might must shall
i you he she it we they me him her us them my your his its our their mine yours
man woman child people friend family mother father brother sister teacher doctor farmer driver
house room door window table chair bed kitchen garden street city village country river mountain
sea sky sun moon star tree flower grass water fire stone sand snow rain wind cloud
day night morning evening week month year time hour minute moment today tomorrow yesterday
book paper letter story song music picture word name voice sound light color
red green blue yellow white black brown gray
big small long short tall old new young good bad happy sad warm cold hot quiet loud fast slow
early late easy hard soft dark bright heavy clean dirty
walk run jump sit stand sleep wake eat drink cook read sing speak talk listen look see watch
hear think know? feel want need like love help make take give bring carry open close begin finish
play work learn teach buy sell pay send find keep leave meet call ask answer move turn
with without about above below under over between behind near far inside outside through across
very really quite almost always never often sometimes usually again still already just only
because while until since before after during""".replace("?", "").split()
FILLER = [w for w in FILLER if w not in {"know", "write", "to", "too", "for", "ate", "won", "owe"}]
# Masks of 160 ms (16 frames, about 40% of frames) instead of NeMo's 400 ms: see BENCHMARKS.md (issue 14).
TRAIN_OVERRIDES = ("model.masking.block_size=16", "model.masking.mask_prob=0.03", "data.batch_duration=20")
# The w2vbert row: 160 ms time patches, as NEST's masks above, and the same share of frames masked.
W2VBERT_OVERRIDES = ("model.w2vbert.patch_size=16",)
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc"]


@dataclasses.dataclass
class Voice:
    accent: str
    variant: str
    pitch: int  # espeak-ng -p, 0..99
    speed: int  # espeak-ng -s, words per minute

    @property
    def name(self) -> str:
        return f"{self.accent}+{self.variant}-p{self.pitch}-s{self.speed}"


def espeak_variants() -> list[str]:
    """Voice variant names (``+m3``, ``+Alicia``, ...) from espeak-ng's data folder."""
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    folder = Path(out.split("Data at:")[-1].strip()) / "voices" / "!v"
    return sorted(p.name for p in folder.iterdir() if p.is_file() and " " not in p.name)


def draw_voices(rng: np.random.Generator, variants: list[str], n: int) -> list[Voice]:
    return [Voice(str(rng.choice(ACCENTS)), v, int(rng.integers(25, 75)), int(rng.integers(130, 200)))
            for v in rng.permutation(variants)[:n]]


def speak(text: str, voice: Voice) -> np.ndarray:
    """espeak-ng's rendering of ``text`` at 16 kHz, float32."""
    wav = subprocess.run(["espeak-ng", "-v", f"{voice.accent}+{voice.variant}", "-p", str(voice.pitch),
                          "-s", str(voice.speed), "--stdout", text], capture_output=True, check=True).stdout
    x, sr = sf.read(__import__("io").BytesIO(wav), dtype="float32")
    return torchaudio.functional.resample(torch.from_numpy(x), sr, SR).numpy()


def load_noise() -> list[np.ndarray]:
    noise = []
    for path in sorted(REAL_NOISE.glob("*.wav")):
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        noise.append(torchaudio.functional.resample(torch.from_numpy(x.mean(1)), sr, SR).numpy())
    if not noise:
        raise SystemExit(f"no real noise under {REAL_NOISE} (../shared/data/real/noise)")
    return noise


def in_noise(x: np.ndarray, noise: list[np.ndarray], rng: np.random.Generator, snr: tuple[float, float]) -> np.ndarray:
    """``x`` padded with 0.1-0.4 s on each side and mixed with a random stretch of real noise at a random SNR."""
    x = np.concatenate([np.zeros(int(rng.uniform(0.1, 0.4) * SR)), x, np.zeros(int(rng.uniform(0.1, 0.4) * SR))])
    n = noise[rng.integers(len(noise))]
    start = int(rng.integers(0, max(1, len(n) - len(x))))
    piece = np.resize(n[start:], len(x))
    gain = np.sqrt(np.mean(x**2) / (np.mean(piece**2) + 1e-12) * 10 ** (-rng.uniform(*snr) / 10))
    y = x + gain * piece
    return (0.5 * y / (np.abs(y).max() + 1e-9)).astype(np.float32)


def write_set(items: list[tuple[str, np.ndarray, dict]], folder: Path) -> Path:
    """FLAC files and a CutSet whose cuts carry one supervision each (text, speaker)."""
    folder.mkdir(parents=True, exist_ok=True)
    cuts = []
    for cut_id, audio, sup in items:
        path = folder / f"{cut_id}.flac"
        sf.write(path, audio, SR)
        rec = Recording.from_file(path, recording_id=cut_id)
        cut = rec.to_cut()
        cut.supervisions = [SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=rec.duration,
                                               **sup)]
        cuts.append(cut)
    manifest = folder / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    return manifest


def build_corpus(work: Path, args) -> dict:
    """Probe train/dev sets and the pretraining set (and a noise set for NEST's augmentation) under ``work``."""
    rng = np.random.default_rng(args.data_seed)
    variants = espeak_variants()
    need = args.train_voices + args.dev_voices + args.pretrain_voices
    if len(variants) < need:
        raise SystemExit(f"espeak-ng has {len(variants)} voice variants, the task needs {need}")
    voices = draw_voices(rng, variants, need)
    train_v, dev_v = voices[: args.train_voices], voices[args.train_voices : args.train_voices + args.dev_voices]
    pre_v = voices[args.train_voices + args.dev_voices :]
    noise = load_noise()
    jobs = []  # (split, cut id, text, voice, seed)
    for split, vs, reps in (("train", train_v, args.train_reps), ("dev", dev_v, 1)):
        for v in vs:
            for w in WORDS:
                for r in range(reps):
                    jobs.append((split, f"{split}-{v.name}-{w}-{r}", w, v))
    for i in range(args.pretrain_utterances):
        v = pre_v[i % len(pre_v)]
        n = int(rng.integers(args.sentence_words[0], args.sentence_words[1] + 1))
        jobs.append(("pretrain", f"pre{i:05d}", " ".join(rng.choice(FILLER, n)), v))
    with ThreadPoolExecutor(args.jobs) as pool:
        audio = list(pool.map(lambda j: speak(j[2], j[3]), jobs))
    sets: dict[str, list] = {"train": [], "dev": [], "pretrain": []}
    for (split, cut_id, text, v), x in zip(jobs, audio):
        if split == "pretrain":  # clean: NEST mixes its own noise on the fly, as it would on a real corpus
            x = (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)
        else:
            x = in_noise(x, noise, rng, tuple(args.snr))
        sets[split].append((cut_id, x, {"text": text, "speaker": v.name}))
    out = {split: str(write_set(items, work / split)) for split, items in sets.items()}
    noise_items = [(f"noise{i}", n, {"text": "", "speaker": "noise"}) for i, n in enumerate(noise)]
    out["noise"] = str(write_set(noise_items, work / "noise"))
    hours = sum(len(x) for x in audio[-args.pretrain_utterances:]) / SR / 3600 if args.pretrain_utterances else 0.0
    out["summary"] = {
        "words": len(WORDS), "train_voices": len(train_v), "dev_voices": len(dev_v), "pretrain_voices": len(pre_v),
        "train_cuts": len(sets["train"]), "dev_cuts": len(sets["dev"]), "pretrain_cuts": len(sets["pretrain"]),
        "pretrain_hours": round(hours, 3), "snr_db": list(args.snr), "variants_available": len(variants),
    }
    (work / "corpus.json").write_text(json.dumps(out, indent=1))
    return out


def kmeans_available() -> str | None:
    """None when k-means targets can be trained in this checkout (issue 13), else why not."""
    import importlib.util

    from nest.objectives import ModelConfig

    if "targets" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        return "model.targets does not exist in this checkout (issue 13)"
    if importlib.util.find_spec("nest.kmeans") is None:
        return "nest.kmeans does not exist in this checkout (issue 13)"
    return None


def run(cmd: list[str], log: Path, threads: int) -> float:
    """Run a command from the project root with ``threads`` torch threads, output into ``log``; seconds."""
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t


def pretrain(work: Path, corpus: dict, args, seed: int, row: str, extra: tuple = (), config: str = "") -> dict:
    """train.py on the pretraining speech; returns the checkpoint, its summary and the seconds taken.

    A run already finished with the same settings (same folder name) is reused.
    """
    overrides = [f"data.train_cuts=[{corpus['pretrain']}]", f"data.noise_cuts=[{corpus['noise']}]",
                 f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every_n_steps={args.steps}",
                 "trainer.enable_progress_bar=false", *args.train_overrides, *extra]
    config = config or args.config
    tag = hashlib.sha256(json.dumps([config, overrides]).encode()).hexdigest()[:8]  # the settings, not the seed
    overrides.append(f"seed={seed}")
    exp = work / f"{row}-{tag}-seed{seed}"
    seconds = 0.0
    if not (exp / "summary.json").is_file():
        seconds = run([sys.executable, "train.py", "--config", config, *overrides, f"exp_dir={exp}"],
                      exp.with_suffix(".log"), args.train_threads)
    summary = json.loads((exp / "summary.json").read_text())
    return {"row": row, "seed": seed, "checkpoint": str(exp / "checkpoints" / "last.ckpt"), "seconds": round(seconds, 1),
            **summary}


def kmeans_corpus(work: Path, corpus: dict, args) -> tuple[dict, tuple]:
    """Issue 13's first HuBERT iteration: the pretraining cuts labelled with k-means of MFCC frames; returns
    the labelled corpus and the train.py overrides that read its labels."""
    km = Path(corpus["pretrain"]).parents[1] / f"kmeans-{args.kmeans_clusters}"  # beside the corpus it labels
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


def plot_summary(acc: dict, weights: dict, baseline: float, path: Path) -> None:
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
    a.set(ylabel="dev accuracy", title="spoken words, held-out voices, real noise")
    a.legend()
    encoders = [r for r in rows if len(weights[r]) > 1]
    width = 0.8 / max(1, len(encoders))
    for k, r in enumerate(encoders):
        b.bar(np.arange(len(weights[r])) + k * width, weights[r], width, label=r)
    layers = max((len(weights[r]) for r in encoders), default=0)
    b.set_xticks(np.arange(layers) + width * (len(encoders) - 1) / 2, [str(i) for i in range(layers)])
    b.set(xlabel="encoder layer (0: first block)", ylabel="weight (softmax, mean over seeds)",
          title="which layers the probe uses")
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
    ap.add_argument("--work", default="exp/bench_probe", help="corpus, checkpoints, caches (reused when present)")
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
    ap.add_argument("--jobs", type=int, default=2, help="espeak-ng processes")
    ap.add_argument("--rows", nargs="+", default=["mel", "random_init", "nest", "kmeans"],
                    help="also: w2vbert (--w2vbert-config, 16-frame time patches)")
    ap.add_argument("--w2vbert-config", default="configs/w2vbert_tiny.yaml")
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        print("benchmarks/probe.py needs espeak-ng to synthesise speech offline: apt-get install -y espeak-ng "
              "(Debian/Ubuntu), brew install espeak-ng (macOS)", file=sys.stderr)
        return 2
    from nest.probe import run_probe

    # On a shared machine one thread per process is several times faster than two that contend for cores.
    torch.set_num_threads(args.threads)
    work = Path(args.work) if Path(args.work).is_absolute() else ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    load_start, wall = os.getloadavg(), {}
    t0 = t = time.perf_counter()
    settings = [args.data_seed, args.train_voices, args.train_reps, args.dev_voices, args.pretrain_voices,
                args.pretrain_utterances, args.sentence_words, args.snr]
    folder = work / f"corpus-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]}"
    corpus = json.loads((folder / "corpus.json").read_text()) if (folder / "corpus.json").is_file() \
        else build_corpus(folder, args)
    wall["corpus"] = round(time.perf_counter() - t, 1)
    kmeans_missing = kmeans_available() if "kmeans" in args.rows else "not asked for"
    rows = [r for r in args.rows if r != "kmeans" or kmeans_missing is None]

    t = time.perf_counter()
    jobs = [(corpus, seed, "nest", ()) for seed in args.seeds if "nest" in rows]
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
        specs = {"mel": "mel", "random_init": f"random:{args.config}"}
        specs.update({i["row"]: i["checkpoint"] for i in trained if i["seed"] == seed})
        for row in rows:
            runs[row].append(run_probe(specs[row], corpus["train"], corpus["dev"], "text", epochs=args.epochs,
                                       seed=seed, cache=work / "cache", out=work / "probe" / f"{row}-seed{seed}"))
    wall["probes"] = round(time.perf_counter() - t, 1)
    wall["total"] = round(time.perf_counter() - t0, 1)

    acc = {row: spread([r["accuracy"] for r in rs]) for row, rs in runs.items()}
    weights = {row: np.mean([r["layer_weights"] for r in rs], 0).round(3).tolist() for row, rs in runs.items()}
    baseline = runs[rows[0]][0]["majority_baseline"]
    plot_summary(acc, weights, baseline, work / "summary.png")
    result = {
        "accuracy": acc,
        "dev_loss": {row: spread([r["loss"] for r in rs]) for row, rs in runs.items()},
        "layer_weights": weights,
        "task": {**corpus["summary"], "label": "text", "classes": runs[rows[0]][0]["num_classes"],
                 "majority_baseline": round(baseline, 4)},
        "pretraining": {row: {"config": args.w2vbert_config if row == "w2vbert" else args.config, "steps": args.steps,
                              "overrides": [*args.train_overrides, *(W2VBERT_OVERRIDES if row == "w2vbert" else ())],
                              "first_loss": [round(i["first_loss"], 3) for i in infos],
                              "last_loss": [round(i["last_loss"], 3) for i in infos],
                              "audio_hours_seen": round(infos[0]["audio_hours_seen"], 2),
                              "seconds": [i["seconds"] for i in infos]}
                        for row in ("nest", "kmeans", "w2vbert") if (infos := [i for i in trained if i["row"] == row])},
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
