"""The corpora of ``benchmarks/probe.py``: synthetic spoken words (espeak-ng) and real spoken digits (FSDD).

Each builder writes Lhotse CutSets under a folder: ``train`` and ``dev`` (the probe's two sides, disjoint
speakers), ``pretrain`` (audio for self-supervised pretraining, its labels never read) and ``noise`` (real
noise that NEST mixes into its input), and returns their paths, the probe's label and a summary.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from lhotse import CutSet, Recording, SupervisionSegment

ROOT = Path(__file__).resolve().parents[1]
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)$")  # {digit}_{speaker}_{take}.wav
FSDD_LABEL = r"re:^(\d)_"  # the probe reads the digit from the cut id, as a user would (nest.probe --label)
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
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
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
    out["noise"] = noise_set(work)
    hours = sum(len(x) for x in audio[-args.pretrain_utterances:]) / SR / 3600 if args.pretrain_utterances else 0.0
    out["label"] = "text"
    out["summary"] = {
        "words": len(WORDS), "train_voices": len(train_v), "dev_voices": len(dev_v), "pretrain_voices": len(pre_v),
        "train_cuts": len(sets["train"]), "dev_cuts": len(sets["dev"]), "pretrain_cuts": len(sets["pretrain"]),
        "pretrain_hours": round(hours, 3), "snr_db": list(args.snr), "variants_available": len(variants),
    }
    (work / "corpus.json").write_text(json.dumps(out, indent=1))
    return out


def noise_set(folder: Path) -> str:
    """The real noise recordings as one CutSet (16 kHz FLAC) for train.py's data.noise_cuts."""
    return str(write_set([(f"noise{i}", n, {"text": "", "speaker": "noise"}) for i, n in enumerate(load_noise())],
                         folder / "noise"))


def build_fsdd(work: Path, source: Path, dev_speaker: str, pretrain: str) -> dict:
    """FSDD's recorded digits (8 kHz WAV, read in place, resampled on load) in folds: each fold scores the probe
    on one speaker (``dev_speaker``, or each speaker in turn with ``"all"``) after training it on the others.
    Pretraining audio: every file (``pretrain="all"``: the held-out speakers' audio too, without labels, as a
    user pretrains on the whole unlabelled corpus) or, with one dev speaker, the probe's train speakers only
    (``"train-speakers"``: that speaker unheard until the probe is scored)."""
    files = sorted((source / "recordings").glob("*.wav"))
    named = [(f, FSDD_NAME.match(f.stem)) for f in files]
    bad = [f.name for f, m in named if m is None]
    if not files or bad:
        raise SystemExit(f"{source / 'recordings'}: {len(files)} WAV files" + (
            f", {len(bad)} not named {{digit}}_{{speaker}}_{{take}}.wav (e.g. {bad[0]})" if bad else "") +
            ": give --fsdd the Free Spoken Digit Dataset folder")
    speakers = sorted({m.group(2) for _, m in named})
    if dev_speaker != "all" and dev_speaker not in speakers:
        raise SystemExit(f"--fsdd-dev-speaker {dev_speaker}: not among {source}'s speakers {speakers} (or all)")
    if dev_speaker == "all" and pretrain != "all":
        raise SystemExit("--fsdd-pretrain train-speakers needs one --fsdd-dev-speaker (each fold would need its "
                         "own pretraining)")
    by_speaker: dict[str, list] = {s: [] for s in speakers}
    for f, m in named:
        rec = Recording.from_file(f, recording_id=f.stem)
        cut = rec.to_cut()
        cut.supervisions = [SupervisionSegment(id=f.stem, recording_id=f.stem, start=0.0, duration=rec.duration,
                                               speaker=m.group(2))]
        by_speaker[m.group(2)].append(cut)
    work.mkdir(parents=True, exist_ok=True)

    def write(name: str, cuts: list) -> str:
        CutSet.from_cuts(cuts).to_file(work / f"{name}.jsonl.gz")
        return str(work / f"{name}.jsonl.gz")

    folds = {}
    for held in speakers if dev_speaker == "all" else [dev_speaker]:
        train = [c for s in speakers if s != held for c in by_speaker[s]]
        folds[held] = {"train": write(f"train-{held}", train), "dev": write(f"dev-{held}", by_speaker[held])}
    pre = [c for s in speakers if pretrain == "all" or s != dev_speaker for c in by_speaker[s]]
    out = {"folds": folds, "pretrain": write("pretrain", pre), "noise": noise_set(work), "label": FSDD_LABEL}
    durations = [c.duration for c in pre]
    out["summary"] = {
        "source": str(source), "digits": 10, "speakers": speakers, "dev_speakers": list(folds),
        "cuts_per_speaker": {s: len(c) for s, c in by_speaker.items()}, "pretrain": pretrain,
        "pretrain_cuts": len(pre), "pretrain_hours": round(sum(durations) / 3600, 3),
        "mean_duration_s": round(float(np.mean(durations)), 3), "sampling_rate": pre[0].sampling_rate,
    }
    (work / "corpus.json").write_text(json.dumps(out, indent=1))
    return out
