"""Does NEST pretraining help ASR fine-tuning in a client we did not write? Prints one JSON object.

  python benchmarks/finetune.py [--work DIR] [--seeds 0 1 2] [--steps 800] [--ft-steps 300]

Needs espeak-ng (``apt-get install -y espeak-ng``), transformers 5 and jiwer (``pip install '.[benchmark]'``).

CTC fine-tuning with transformers' ``ParakeetForCTC`` (character vocabulary, greedy decoding) whose encoder is
(a) ``nest`` our NEST encoder after ``train.py`` pretraining, exported with ``nest-export --format hf``, and
(b) ``random_init`` the same model at the initialisation that pretraining with that seed starts from, exported
the same way. Everything else is equal: features (``ParakeetFeatureExtractor``), head initialisation, data
order, optimiser, steps. Two labelled sets, CER and WER (jiwer) on held-out speakers, 3 seeds (pretraining,
head and data order):

- ``espeak``: sentences of 2-4 words among ``benchmarks/probe.py``'s 20 (digits and commands) said by espeak-ng
  voices in real noise (``../shared/data/real/noise``, 5-25 dB); train and test voices disjoint, and disjoint
  from the pretraining voices, which read sentences of other words (``probe.py``'s corpus builder and
  pretraining, 160 ms masks).
- ``fsdd``: the real spoken digits of ``../shared/data/fsdd`` (8 kHz, resampled to 16 kHz), trained on three
  speakers and tested on the fourth (``--fsdd-test``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import probe  # noqa: E402  the espeak-ng corpus, pretraining runs and report helpers of benchmarks/probe.py

FSDD = ROOT.parent / "shared" / "data" / "fsdd" / "recordings"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SR = probe.SR


def build_corpus(folder: Path, args) -> dict:
    """The pretraining set (probe.py's: sentences of other words) and the espeak ASR sets, under ``folder``."""
    rng = np.random.default_rng(args.data_seed)
    variants = probe.espeak_variants()
    need = args.train_voices + args.test_voices + args.pretrain_voices
    if len(variants) < need:
        raise SystemExit(f"espeak-ng has {len(variants)} voice variants, the task needs {need}")
    voices = probe.draw_voices(rng, variants, need)
    splits = {"train": voices[: args.train_voices],
              "test": voices[args.train_voices: args.train_voices + args.test_voices]}
    pre_v = voices[args.train_voices + args.test_voices:]
    jobs = []  # (split, cut id, text, voice)
    for split, vs in splits.items():
        for v in vs:
            for r in range(args.sentences):
                text = " ".join(rng.choice(probe.WORDS, int(rng.integers(2, 5))))
                jobs.append((split, f"{split}-{v.name}-{r}", text, v))
    for i in range(args.pretrain_utterances):
        n = int(rng.integers(args.sentence_words[0], args.sentence_words[1] + 1))
        jobs.append(("pretrain", f"pre{i:05d}", " ".join(rng.choice(probe.FILLER, n)), pre_v[i % len(pre_v)]))
    with ThreadPoolExecutor(args.jobs) as pool:
        audio = list(pool.map(lambda j: probe.speak(j[2], j[3]), jobs))
    noise = probe.load_noise()
    sets: dict[str, list] = {"train": [], "test": [], "pretrain": []}
    for (split, cut_id, text, v), x in zip(jobs, audio):
        if split == "pretrain":  # clean: NEST mixes its own noise on the fly
            x = (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)
        else:
            x = probe.in_noise(x, noise, rng, tuple(args.snr))
        sets[split].append((cut_id, x, {"text": text, "speaker": v.name}))
    out = {"pretrain": str(probe.write_set(sets["pretrain"], folder / "pretrain"))}
    for split in ("train", "test"):
        np.savez(folder / f"espeak_{split}.npz", *[x for _, x, _ in sets[split]])
        (folder / f"espeak_{split}.json").write_text(json.dumps([s["text"] for _, _, s in sets[split]]))
    out["noise"] = str(probe.write_set([(f"noise{i}", n, {"text": "", "speaker": "noise"})
                                        for i, n in enumerate(noise)], folder / "noise"))
    out["summary"] = {"train_voices": len(splits["train"]), "test_voices": len(splits["test"]),
                      "pretrain_voices": len(pre_v), "train_utterances": len(sets["train"]),
                      "test_utterances": len(sets["test"]), "pretrain_utterances": len(sets["pretrain"]),
                      "pretrain_hours": round(sum(len(x) for _, x, _ in sets["pretrain"]) / SR / 3600, 3)}
    (folder / "corpus.json").write_text(json.dumps(out, indent=1))
    return out


def espeak_set(folder: Path, split: str) -> tuple[list[np.ndarray], list[str]]:
    arrays = np.load(folder / f"espeak_{split}.npz")
    return [arrays[f"arr_{i}"] for i in range(len(arrays.files))], json.loads((folder / f"espeak_{split}.json").read_text())


def fsdd_set(speakers: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """The recordings of ``speakers`` at 16 kHz and their digit words (file names: {digit}_{speaker}_{take}.wav)."""
    audio, text = [], []
    for path in sorted(FSDD.glob("*.wav")):
        digit, speaker, _ = path.stem.split("_")
        if speaker in speakers:
            x, sr = sf.read(path, dtype="float32", always_2d=True)
            audio.append(torchaudio.functional.resample(torch.from_numpy(x.mean(1)), sr, SR).numpy())
            text.append(DIGITS[int(digit)])
    return audio, text


def features(folder: Path, audio: list[np.ndarray]) -> list[torch.Tensor]:
    """ParakeetFeatureExtractor's log-mel frames (T, F) of each utterance, from the exported folder."""
    from transformers import ParakeetFeatureExtractor

    extractor = ParakeetFeatureExtractor.from_pretrained(folder)
    return [extractor(x, sampling_rate=SR, return_tensors="pt")["input_features"][0] for x in audio]


def collate(feats: list[torch.Tensor], labels: list[list[int]] | None = None):
    """Padded features (B, T, F), attention mask (B, T)[, labels (B, U) padded with -100]."""
    lens = torch.tensor([len(f) for f in feats])
    x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    mask = torch.arange(x.shape[1])[None] < lens[:, None]
    if labels is None:
        return x, mask
    y = torch.full((len(labels), max(map(len, labels))), -100)
    for i, ids in enumerate(labels):
        y[i, : len(ids)] = torch.tensor(ids)
    return x, mask, y


def finetune(folder: Path, train: tuple, test: tuple, vocab: list[str], seed: int, args) -> dict:
    """CTC fine-tuning of ParakeetForCTC on the exported encoder of ``folder``; CER/WER on ``test``."""
    import jiwer
    from safetensors.torch import load_file
    from transformers import ParakeetCTCConfig, ParakeetEncoderConfig, ParakeetForCTC

    torch.manual_seed(seed)
    blank = len(vocab)
    config = ParakeetCTCConfig(encoder_config=ParakeetEncoderConfig.from_pretrained(folder).to_dict(),
                               vocab_size=len(vocab) + 1, pad_token_id=blank)
    model = ParakeetForCTC(config)
    model.encoder.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    index = {c: i for i, c in enumerate(vocab)}
    feats, texts = train
    labels = [[index[c] for c in t] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3)
    warmup = max(1, args.ft_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, (s - warmup) / max(1, args.ft_steps - warmup))))) if s >= warmup else (s + 1) / warmup)
    rng = np.random.default_rng(seed)
    order, losses = np.array([], dtype=int), []
    model.train()
    for step in range(args.ft_steps):
        if len(order) < args.batch:
            order = np.concatenate([order, rng.permutation(len(feats))])
        pick, order = order[: args.batch], order[args.batch:]
        x, mask, y = collate([feats[i] for i in pick], [labels[i] for i in pick])
        loss = model(input_features=x, attention_mask=mask, labels=y).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    hyps = []
    test_feats, refs = test
    with torch.no_grad():
        for start in range(0, len(test_feats), 32):
            x, mask = collate(test_feats[start: start + 32])
            ids = model.generate(input_features=x, attention_mask=mask)
            for row in ids.tolist():
                out, prev = [], None
                for i in row:  # CTC: collapse repeats, drop blanks
                    if i != prev and i != blank:
                        out.append(vocab[i])
                    prev = i
                hyps.append(" ".join("".join(out).split()))
    return {"cer": jiwer.cer(refs, hyps), "wer": jiwer.wer(refs, hyps), "first_loss": losses[0],
            "last_loss": float(np.mean(losses[-20:])), "example": [refs[0], hyps[0]]}


def export_hf(ckpt: Path, out: Path) -> Path:
    """``nest-export CKPT OUT --format hf`` as a user runs it."""
    if not (out / "config.json").is_file():
        r = subprocess.run([sys.executable, "-m", "nest.export", str(ckpt), str(out), "--format", "hf", "--force"],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode:
            raise RuntimeError(f"nest-export failed: {r.stderr}")
    return out


def random_init(work: Path, config: str, seed: int) -> Path:
    """save_model of ``config``'s model drawn as train.py draws it with ``seed`` (the encoder pretraining starts from)."""
    from nest.config import load_model_config
    from nest.io.checkpoint import save_model
    from nest.objectives import build_model

    path = work / f"random_init-{hashlib.sha256(config.encode()).hexdigest()[:8]}-seed{seed}.pt"
    if not path.is_file():
        cfg = load_model_config(ROOT / config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            save_model(build_model(cfg), path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="exp/bench_finetune", help="corpus, checkpoints, exports (reused when present)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="configs/nest_tiny.yaml")
    ap.add_argument("--steps", type=int, default=800, help="pretraining steps per seed")
    ap.add_argument("--train-overrides", nargs="*", default=list(probe.TRAIN_OVERRIDES), help="key=value for train.py")
    ap.add_argument("--parallel", type=int, default=3, help="pretraining runs at once")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads per pretraining run")
    ap.add_argument("--ft-steps", type=int, default=800, help="fine-tuning steps per run")
    ap.add_argument("--batch", type=int, default=16, help="utterances per fine-tuning step")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (10%% warm-up, cosine decay)")
    ap.add_argument("--train-voices", type=int, default=24)
    ap.add_argument("--test-voices", type=int, default=10)
    ap.add_argument("--sentences", type=int, default=20, help="espeak sentences per ASR voice")
    ap.add_argument("--pretrain-voices", type=int, default=56)
    ap.add_argument("--pretrain-utterances", type=int, default=1200)
    ap.add_argument("--sentence-words", type=int, nargs=2, default=[5, 14], help="words per pretraining sentence")
    ap.add_argument("--snr", type=float, nargs=2, default=[5.0, 25.0], help="dB, ASR utterances in real noise")
    ap.add_argument("--fsdd-test", default="nicolas", help="the FSDD speaker held out for testing")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="espeak-ng processes")
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        print("benchmarks/finetune.py needs espeak-ng: apt-get install -y espeak-ng", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    work = Path(args.work) if Path(args.work).is_absolute() else ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    load_start, wall = os.getloadavg(), {}
    t0 = t = time.perf_counter()
    settings = [args.data_seed, args.train_voices, args.test_voices, args.sentences, args.pretrain_voices,
                args.pretrain_utterances, args.sentence_words, args.snr]
    folder = work / f"corpus-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]}"
    folder.mkdir(exist_ok=True)
    corpus = json.loads((folder / "corpus.json").read_text()) if (folder / "corpus.json").is_file() \
        else build_corpus(folder, args)
    wall["corpus"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        trained = list(pool.map(lambda s: probe.pretrain(work, corpus, args, s, "nest"), args.seeds))
    wall["pretraining"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    speakers = sorted({p.stem.split("_")[1] for p in FSDD.glob("*.wav")})
    if args.fsdd_test not in speakers:
        raise SystemExit(f"--fsdd-test {args.fsdd_test}: FSDD speakers here are {speakers}")
    data = {"espeak": (espeak_set(folder, "train"), espeak_set(folder, "test")),
            "fsdd": (fsdd_set([s for s in speakers if s != args.fsdd_test]), fsdd_set([args.fsdd_test]))}
    runs: dict = {name: {"nest": [], "random_init": []} for name in data}
    feats: dict = {}  # every export has the same front end (checked): features are computed once
    for info in trained:
        seed = info["seed"]
        ckpt, init = Path(info["checkpoint"]), random_init(work, args.config, seed)
        # Folders named after what they hold: the pretraining run (its settings' tag), the config's initialisation.
        encoders = {"nest": export_hf(ckpt, work / f"hf-{ckpt.parents[1].name}"),
                    "random_init": export_hf(init, work / f"hf-{init.stem}")}
        for name, ((train_audio, train_text), (test_audio, test_text)) in data.items():
            vocab = sorted(set("".join(train_text + test_text)))
            for row, hf in encoders.items():
                front_end = (hf / "preprocessor_config.json").read_text()
                if feats.setdefault(name, (front_end, features(hf, train_audio), features(hf, test_audio)))[0] != front_end:
                    raise RuntimeError(f"{hf}: another front end than the other exports")
                _, train_feats, test_feats = feats[name]
                result = finetune(hf, (train_feats, train_text), (test_feats, test_text), vocab, seed, args)
                runs[name][row].append({"seed": seed, **result})
    wall["finetuning"] = round(time.perf_counter() - t, 1)
    wall["total"] = round(time.perf_counter() - t0, 1)

    table = {name: {row: {metric: probe.spread([r[metric] for r in rs]) for metric in ("cer", "wer")}
                    for row, rs in rows.items()} for name, rows in runs.items()}
    result = {
        "cer_wer": table,
        # Paired by seed (same head, data order and features): negative means the pretrained encoder did better.
        "nest_minus_random_init": {name: {metric: probe.spread([a[metric] - b[metric] for a, b in
                                                                zip(rows["nest"], rows["random_init"])])
                                          for metric in ("cer", "wer")} for name, rows in runs.items()},
        "runs": runs,
        "task": {"espeak": {**corpus["summary"], "train": len(data["espeak"][0][1]), "test": len(data["espeak"][1][1]),
                            "snr_db": list(args.snr)},
                 "fsdd": {"train_speakers": [s for s in speakers if s != args.fsdd_test], "test_speaker": args.fsdd_test,
                          "train": len(data["fsdd"][0][1]), "test": len(data["fsdd"][1][1])}},
        "pretraining": {"config": args.config, "steps": args.steps, "overrides": args.train_overrides,
                        "first_loss": [round(i["first_loss"], 3) for i in trained],
                        "last_loss": [round(i["last_loss"], 3) for i in trained], "seconds": [i["seconds"] for i in trained]},
        "finetuning": {"model": "transformers ParakeetForCTC", "steps": args.ft_steps, "batch": args.batch,
                       "lr": args.lr, "schedule": "AdamW, 10% warm-up, cosine", "decoding": "greedy CTC"},
        "wall_seconds": wall,
        "cpu_seconds": round(probe.cpu_seconds(), 1),
        "load_average": {"start": round(load_start[0], 1), "end": round(os.getloadavg()[0], 1)},
        "machine": probe.machine(),
        "date": date.today().isoformat(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
