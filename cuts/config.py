"""Configuration of the training data path (the ``data`` section of a run)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union


@dataclass
class NoiseConfig:
    """On-the-fly augmentation, as NeMo's MultiSpeakerNoiseAugmentation defaults for NEST."""

    prob: float = 0.5  # probability that an utterance is augmented at all
    noise_ratio: float = 0.5  # of augmented utterances, the share mixed with noise (else another utterance)
    snr: List[float] = field(default_factory=lambda: [-5.0, 20.0])  # dB range, noise
    speech_snr: List[float] = field(default_factory=lambda: [-5.0, 5.0])  # dB range, speech-in-speech
    mix_rate: List[float] = field(default_factory=lambda: [0.5, 0.5])  # range of the share of the utterance covered
    num_segments: List[int] = field(default_factory=lambda: [1, 1])  # range of the number of interference segments
    num_speakers: List[int] = field(default_factory=lambda: [1, 1])  # range of other utterances in speech mode
    snr_definition: str = "nemo"  # nemo: one gain, noise energy over the whole utterance | segment: per piece


@dataclass
class DataConfig:
    """Where the cuts are and how they become batches."""

    train_cuts: List[str] = field(default_factory=list)  # CutSet manifests (.jsonl.gz, local or URL) or Shar folders
    train_weights: List[float] = field(default_factory=list)  # one per train_cuts entry; empty: equal
    val_cuts: List[str] = field(default_factory=list)  # validation CutSets (empty: no validation)
    noise_cuts: List[str] = field(default_factory=list)  # noise CutSets from `nest-prepare noise` (empty: speech-in-speech only)
    bins: Optional[str] = None  # bins.yaml from `nest-prepare bins` (null: estimated from the first cuts)
    bucket_batch_size: Optional[str] = None  # batch_sizes.yaml from `nest-prepare calibrate` (replaces batch_duration)
    batch_duration: float = 600.0  # seconds of audio per batch, padding included
    quadratic_duration: Optional[float] = None  # lhotse's quadratic_duration: penalise long cuts (null: off)
    num_buckets: int = 30  # duration buckets when data.bins is not given
    min_duration: float = 1.0  # shorter cuts are left out (seconds)
    max_duration: float = 60.0  # longer cuts are left out (seconds)
    shuffle_buffer_size: int = 10000  # cuts held by the bucketing sampler for shuffling
    drop_last: bool = True  # drop the last, incomplete batch of each bucket
    num_workers: Union[int, str] = 2  # dataloader processes per rank (Shar: each reads its own shards); auto: the cores per local rank less one
    mix_on_device: bool = False  # the interference is placed and scaled on the accelerator (workers send its pieces)
    noise_bank_seconds: float = 0.0  # >0 (with mix_on_device): noise drawn from this much of the noise set, decoded once per rank into device memory (1 h: 230 MB); workers decode clean audio only
    val_batch_duration: Optional[float] = None  # default: batch_duration
    max_failed_fraction: float = 0.1  # stop when more than this share of recent cuts failed to load
    read_timeout: float = 60.0  # seconds before a stalled audio read counts as failed (0: wait forever)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
