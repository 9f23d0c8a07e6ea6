"""LightningDataModule: lazy CutSets -> sampler -> workers -> AudioNoiseBatch, with resumable position."""
from __future__ import annotations

import logging
import random
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from lhotse import CutSet

from cuts.bins import Bins
from cuts.config import DataConfig
from cuts.dataset import NestDataset, at_rate
from cuts.noise import NoiseMixer
from cuts.sampler import EpochSampler, build_sampler, combine_cuts, open_cuts

log = logging.getLogger(__name__)


def load_noise(sources: list[str], sample_rate: int, seed: int) -> list:
    """Noise cuts held in memory for random access, resampled (lazily) to the model's rate."""
    noise = []
    for s in sources:
        noise.extend(at_rate(c, sample_rate) for c in open_cuts(s, seed))
    if sources and not noise:
        raise ValueError(f"data.noise_cuts {sources} hold no cuts")
    return noise


class WorkerSeeder:
    """Seeds Python, NumPy and torch in each dataloader worker from (run seed, rank, worker id)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        s = (self.seed * 1_000_003 + self.rank * 1009 + worker_id) % 2**32
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)


class NestDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, sample_rate: int, seed: int):
        super().__init__()
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.seed = seed
        self.position = (0, 0)  # (epoch, batches consumed by training), saved in checkpoints
        self._train_sampler: Optional[EpochSampler] = None

    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        return 1, 0

    def _bins(self) -> Optional[Bins]:
        return Bins.load(self.cfg.bins) if self.cfg.bins else None

    def _loader(self, sampler: EpochSampler, mixer: Optional[NoiseMixer], seed: int) -> torch.utils.data.DataLoader:
        _, rank = self._rank()
        return torch.utils.data.DataLoader(
            NestDataset(self.sample_rate, mixer, seed),
            sampler=sampler,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            worker_init_fn=WorkerSeeder(seed, rank),
            persistent_workers=False,
            prefetch_factor=2 if self.cfg.num_workers > 0 else None,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        world, rank = self._rank()
        cuts = combine_cuts(self.cfg.train_cuts, self.cfg.train_weights, self.seed)
        sampler = EpochSampler(
            build_sampler(cuts, self.cfg, train=True, seed=self.seed, world_size=world, rank=rank, bins=self._bins()),
            endless=True,
        )
        sampler.position = self.position
        self._train_sampler = sampler
        mixer = NoiseMixer(self.cfg.noise, load_noise(self.cfg.noise_cuts, self.sample_rate, self.seed))
        return self._loader(sampler, mixer, self.seed)

    def val_dataloader(self):
        if not self.cfg.val_cuts:
            return []
        world, rank = self._rank()
        cuts = CutSet.mux(*[open_cuts(s, self.seed) for s in self.cfg.val_cuts]) if len(self.cfg.val_cuts) > 1 \
            else open_cuts(self.cfg.val_cuts[0], self.seed)
        sampler = EpochSampler(
            build_sampler(cuts, self.cfg, train=False, seed=self.seed, world_size=world, rank=rank, bins=self._bins()),
            endless=False,
        )
        # Validation noise has a seed of its own so that val loss compares across runs of any seed.
        mixer = NoiseMixer(self.cfg.noise, load_noise(self.cfg.noise_cuts, self.sample_rate, 0))
        return self._loader(sampler, mixer, seed=0)

    def mark_consumed(self, epoch: int, index: int) -> None:
        """Called by the training loop after each batch: the next batch to train on follows it."""
        self.position = (epoch, index + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.position[0], "batches_done": self.position[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = (int(state["epoch"]), int(state["batches_done"]))
