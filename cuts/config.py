"""Configuration of the training data path (the ``data`` section of a run)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class NoiseConfig:
    """On-the-fly augmentation, as NeMo's MultiSpeakerNoiseAugmentation defaults for NEST."""

    prob: float = 0.5  # probability that an utterance is augmented at all
    noise_ratio: float = 0.5  # of augmented utterances, the share mixed with noise (else another utterance)
    snr: List[float] = field(default_factory=lambda: [-5.0, 20.0])  # dB, noise
    speech_snr: List[float] = field(default_factory=lambda: [-5.0, 5.0])  # dB, speech-in-speech
    mix_rate: List[float] = field(default_factory=lambda: [0.5, 0.5])  # share of the utterance covered
    num_segments: List[int] = field(default_factory=lambda: [1, 1])  # interference segments
    num_speakers: List[int] = field(default_factory=lambda: [1, 1])  # other utterances in speech mode
    snr_definition: str = "nemo"  # nemo: one gain, noise energy over the whole utterance | segment: per piece


@dataclass
class DataConfig:
    """Where the cuts are and how they become batches."""

    train_cuts: List[str] = field(default_factory=list)  # CutSet manifests or Shar folders
    train_weights: List[float] = field(default_factory=list)  # one per train_cuts entry; empty: equal
    val_cuts: List[str] = field(default_factory=list)
    noise_cuts: List[str] = field(default_factory=list)
    bins: Optional[str] = None  # bins.yaml from `prepare.py bins`
    bucket_batch_size: Optional[str] = None  # batch_sizes.yaml from `prepare.py calibrate`
    batch_duration: float = 600.0  # seconds of audio per batch, padding included
    quadratic_duration: Optional[float] = None
    num_buckets: int = 30
    min_duration: float = 1.0
    max_duration: float = 60.0
    shuffle_buffer_size: int = 10000
    drop_last: bool = True
    num_workers: int = 2
    val_batch_duration: Optional[float] = None  # default: batch_duration
    noise: NoiseConfig = field(default_factory=NoiseConfig)
