"""Lightning's view of the data feed (cuts.feed.DataFeed): its loaders and its position in checkpoints."""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch

from cuts.dataset import AudioNoiseBatch, TimedReader
from cuts.feed import DataFeed


class NestDataModule(pl.LightningDataModule):
    """Passes Lightning's hooks to ``feed``. Lightning stores ``state_dict`` in checkpoints under this class's
    name: keep the name, or old checkpoints lose their data position."""

    def __init__(self, feed: DataFeed):
        super().__init__()
        self.feed = feed
        self._bank: Optional[torch.Tensor] = None

    def setup(self, stage: str) -> None:
        # Called once the strategy knows the world: before loaders are made and checkpoints restored.
        cuda = self.trainer.strategy.root_device.type == "cuda"
        self.feed.place(self.trainer.world_size, self.trainer.global_rank, pin_memory=cuda,
                        local_world_size=self.trainer.num_devices)
        if self.trainer.world_size > 1:  # the first rank's worker count for all: Shar streams are rank x worker
            self.feed.num_workers = self.trainer.strategy.broadcast(self.feed.num_workers, src=0)

    def noise_bank(self, device: torch.device) -> Optional[torch.Tensor]:
        """The training loader's noise bank in ``device`` memory, decoded and moved once (None without one)."""
        if self._bank is None or self._bank.device != device:
            bank = self.feed.bank  # decoded here, under the read watchdog, with no copy kept on the host
            self._bank = None if bank is None else bank.load(TimedReader(self.feed.cfg.read_timeout)).to(device)
        return self._bank

    def train_dataloader(self):
        return self.feed.train_dataloader()

    def val_dataloader(self):
        return self.feed.val_dataloader()

    def batch_done(self, batch: AudioNoiseBatch, window_end: bool) -> None:
        """After each training batch; the position moves at the end of an accumulation window."""
        self.feed.batch_done(batch, window_end)

    def state_dict(self) -> dict[str, Any]:
        return self.feed.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feed.load_state_dict(state)
