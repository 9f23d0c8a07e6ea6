"""A small synthetic speech-like corpus and noise set, so that the demo needs no download.

Utterances are voiced "syllables": a glottal pulse train with a drifting pitch, shaped by three
formant resonances that jump between vowel-like targets, with syllable envelopes and pauses.
Noises are coloured noise, hum with harmonics, and babble made of overlapped utterances.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (440, 1020, 2240), (660, 1720, 2410), (490, 1350, 1690)]


def resonator(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    """Second-order resonance (a formant) applied to ``x``."""
    r = np.exp(-np.pi * bw / sr)
    a = torch.tensor([1.0, -2 * r * np.cos(2 * np.pi * freq / sr), r * r], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    return torchaudio.functional.lfilter(torch.from_numpy(x), a, b, clamp=False).numpy()


def syllable(rng: np.random.Generator, sr: int, f0: float) -> np.ndarray:
    dur = rng.uniform(0.12, 0.35)
    n = int(dur * sr)
    pitch = f0 * (1 + 0.1 * np.sin(np.linspace(0, rng.uniform(1, 4), n))) * rng.uniform(0.9, 1.1)
    phase = np.cumsum(pitch / sr)
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)  # one pulse per period
    source += 0.02 * rng.standard_normal(n)  # breath
    f1, f2, f3 = VOWELS[rng.integers(len(VOWELS))]
    y = sum(resonator(source, f, 80 + 0.05 * f, sr) * g for f, g in ((f1, 1.0), (f2, 0.6), (f3, 0.3)))
    env = np.sin(np.linspace(0, np.pi, n)) ** 0.7
    return y * env


def utterance(rng: np.random.Generator, sr: int, duration: float) -> np.ndarray:
    f0 = rng.uniform(90, 240)  # speaker pitch
    parts, total = [], 0
    while total < duration * sr:
        s = syllable(rng, sr, f0)
        if rng.random() < 0.15:
            s = np.concatenate([s, np.zeros(int(rng.uniform(0.1, 0.4) * sr))])  # pause
        parts.append(s)
        total += len(s)
    x = np.concatenate(parts)[: int(duration * sr)]
    return (0.3 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def noise(rng: np.random.Generator, sr: int, duration: float, kind: str) -> np.ndarray:
    n = int(duration * sr)
    if kind == "hum":
        t = np.arange(n) / sr
        f = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * f * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
        x = x + 0.1 * rng.standard_normal(n)
    elif kind == "babble":
        x = sum(utterance(rng, sr, duration) for _ in range(4))
    else:  # coloured noise: white noise with a random spectral tilt
        spec = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / sr) + 1.0
        x = np.fft.irfft(spec / freqs ** rng.uniform(0.0, 1.0), n)
    return (0.3 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def synthesize_corpus(out: Path, num_utterances: int = 240, num_noises: int = 12, seed: int = 0) -> dict:
    """Writes ``out/speech/{train,dev}/*.flac`` (1-12 s, 16 kHz, a few at 8 kHz) and ``out/noise/*.wav``."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    total = 0.0
    for i in range(num_utterances):
        split = "dev" if i % 10 == 0 else "train"
        sr = 8000 if i % 17 == 3 else 16000  # a few at another rate: resampled on load
        duration = float(np.clip(rng.gamma(2.2, 2.0) + 1.0, 1.0, 12.0))
        path = out / "speech" / split / f"utt{i:05d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, utterance(rng, sr, duration), sr)
        total += duration
    kinds = ["coloured", "hum", "babble"]
    for i in range(num_noises):
        path = out / "noise" / f"noise{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, noise(rng, 16000, rng.uniform(4, 15), kinds[i % 3]), 16000)
    return {"utterances": num_utterances, "speech_hours": total / 3600, "noises": num_noises, "out": str(out)}
