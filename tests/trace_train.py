"""Test helper: run train.py's training with every step's cut ids and loss appended to a JSONL trace.

  python -m tests.trace_train TRACE KILL_AT_STEP key=value ...

With KILL_AT_STEP >= 0 the process SIGKILLs itself once that many optimizer steps are done. The
environment variable NEST_TEST_FAIL_RANK=R makes every cut of rank R's batches fail to load.
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
        out = step(self, batch, batch_idx)
        with open(trace, "a") as f:
            f.write(json.dumps({"step": self.global_step, "rank": self.global_rank, "epoch": batch.epoch,
                                "index": batch.index, "worker": batch.worker, "cut_ids": batch.cut_ids,
                                "failed": len(batch.failed), "loss": self.last_loss.item()}) + "\n")
        return out

    def killing_batch_end(self, outputs, batch, batch_idx):
        batch_end(self, outputs, batch, batch_idx)
        if self.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    lightning.NestLightningModule.training_step = traced_step
    lightning.NestLightningModule.on_train_batch_end = killing_batch_end
    fail_rank = os.environ.get("NEST_TEST_FAIL_RANK")
    if fail_rank is not None:
        from cuts import dataset

        read = dataset.TimedReader.__call__

        def failing(self, cut):
            if int(os.environ.get("LOCAL_RANK", 0)) == int(fail_rank):
                raise OSError(f"injected failure of {cut.id}")
            return read(self, cut)

        dataset.TimedReader.__call__ = failing
    train(load_config("configs/nest_tiny.yaml", overrides))


if __name__ == "__main__":
    main()
