"""Test helper: run train.py's training with every step's cut ids and loss appended to a JSONL trace.

  python -m tests.trace_train TRACE KILL_AT_STEP key=value ...

With KILL_AT_STEP >= 0 the process SIGKILLs itself once that many optimizer steps are done.
"""
import json
import os
import signal
import sys

from nest import lightning
from nest.config import load_config
from nest.run import train


def main() -> None:
    trace, kill_at, *overrides = sys.argv[1:]
    kill_at = int(kill_at)
    step = lightning.NestLightningModule.training_step
    batch_end = lightning.NestLightningModule.on_train_batch_end

    def traced_step(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        with open(trace, "a") as f:
            f.write(json.dumps({"step": self.global_step, "rank": self.global_rank, "epoch": batch.epoch,
                                "cut_ids": batch.cut_ids, "loss": loss.item()}) + "\n")
        return loss

    def killing_batch_end(self, outputs, batch, batch_idx):
        batch_end(self, outputs, batch, batch_idx)
        if self.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    lightning.NestLightningModule.training_step = traced_step
    lightning.NestLightningModule.on_train_batch_end = killing_batch_end
    train(load_config("configs/nest_tiny.yaml", overrides))


if __name__ == "__main__":
    main()
