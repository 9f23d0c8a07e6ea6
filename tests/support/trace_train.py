"""Test helper: run train.py's training with every step's cut ids and loss appended to a JSONL trace.

  python -m tests.support.trace_train TRACE KILL_AT_STEP [--config CONFIG] key=value ...

With KILL_AT_STEP >= 0 the process SIGKILLs itself once that many optimizer steps are done. Environment:
NEST_TEST_FAIL_RANK=R makes every cut of rank R's batches fail to load; NEST_TEST_NAN=R:N makes rank R's
N-th micro-batch (from 1) give a non-finite loss; NEST_TEST_DUMP=DIR writes each rank's final parameters
and the audio tar files it opened into DIR; NEST_TEST_SYNCS=1 records the host syncs of each whole loop
iteration of Lightning (its own code, the step, the callbacks) as ``syncs``, and ``logging``, with the number
of synchronised BatchNorm layers (``synced_bn``) and the DDP wrapper's options (``ddp``);
NEST_TEST_SIGUSR1_AT=N sends the process SIGUSR1 once N optimizer steps are done.
"""
import json
import os
import signal
import sys

from nest.config import load_config
from nest.training import module as lightning
from nest.training.run import train


def main() -> None:
    trace, kill_at, *overrides = sys.argv[1:]
    kill_at = int(kill_at)
    config = "configs/nest_tiny.yaml"
    if overrides[:1] == ["--config"]:
        config, overrides = overrides[1], overrides[2:]
    step = lightning.NestLightningModule.training_step
    batch_end = lightning.NestLightningModule.on_train_batch_end

    count_syncs = os.environ.get("NEST_TEST_SYNCS") == "1"
    records = []

    def traced_step(self, batch, batch_idx):
        logging = self.is_logging_step()
        out = step(self, batch, batch_idx)
        extra = {}
        if count_syncs:
            from nest.training.sync_batchnorm import SyncedBatchNorm

            wrapper = self.trainer.strategy.model
            extra = {"synced_bn": sum(isinstance(m, SyncedBatchNorm) for m in self.modules()),
                     "ddp": {k: getattr(wrapper, k, None) for k in ("broadcast_buffers", "gradient_as_bucket_view")}}
        records.append({**extra, "step": self.global_step, "rank": self.global_rank, "epoch": batch.epoch,
                        "index": batch.index, "worker": batch.worker, "cut_ids": batch.cut_ids,
                        "failed": len(batch.failed), "logging": logging,
                        "loss": None if count_syncs else self.last_loss.item()})  # .item(): a sync of its own
        if not count_syncs:
            flush()
        return out

    def flush(syncs=None) -> None:
        with open(trace, "a") as f:
            for r in records:
                f.write(json.dumps({**r, "syncs": syncs}) + "\n")
        records.clear()

    if count_syncs:
        from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

        from nest.training.syncs import HostSyncCounter

        advance = _TrainingEpochLoop.advance

        def counted(self, data_fetcher):
            with HostSyncCounter() as syncs:
                advance(self, data_fetcher)
            flush(dict(syncs.calls))

        _TrainingEpochLoop.advance = counted

    usr1_at = int(os.environ.get("NEST_TEST_SIGUSR1_AT", -1))

    def killing_batch_end(self, outputs, batch, batch_idx):
        batch_end(self, outputs, batch, batch_idx)
        if self.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.global_step == usr1_at and self.guard.between_windows:
            os.kill(os.getpid(), signal.SIGUSR1)

    rank = int(os.environ.get("LOCAL_RANK", 0))
    nan = os.environ.get("NEST_TEST_NAN")
    if nan:
        nan_rank, nan_at = map(int, nan.split(":"))
        forward, seen = lightning.NestLightningModule.forward, {"n": 0}

        def poisoned(self, batch):
            out = forward(self, batch)
            if self.training:
                seen["n"] += 1
                if rank == nan_rank and seen["n"] == nan_at:
                    out.loss = out.loss * float("nan")
            return out

        lightning.NestLightningModule.forward = poisoned
    dump = os.environ.get("NEST_TEST_DUMP")
    if dump:
        import torch
        from lhotse.shar.readers import tar

        init = tar.TarIterator.__init__

        def recorded(self, source):
            if torch.utils.data.get_worker_info() is not None:  # the training streams' reads, not start-up checks
                with open(os.path.join(dump, f"opened_rank{rank}.txt"), "a") as f:
                    f.write(f"{source}\n")
            init(self, source)

        tar.TarIterator.__init__ = recorded
        from cuts import shar

        shards_of = shar.SharStream.shards_of

        def assigned(self, epoch, worker):
            shards = shards_of(self, epoch, worker)
            with open(os.path.join(dump, f"assigned_rank{rank}.txt"), "a") as f:
                f.write(json.dumps({"epoch": epoch, "worker": worker, "tars": [s.recording for s in shards]}) + "\n")
            return shards

        shar.SharStream.shards_of = assigned
        train_end = lightning.NestLightningModule.on_train_end

        def dump_params(self):
            train_end(self)
            torch.save(self.model.state_dict(), os.path.join(dump, f"params_rank{rank}.pt"))

        lightning.NestLightningModule.on_train_end = dump_params
    lightning.NestLightningModule.training_step = traced_step
    lightning.NestLightningModule.on_train_batch_end = killing_batch_end
    fail_rank = os.environ.get("NEST_TEST_FAIL_RANK")
    if fail_rank is not None:
        from cuts import dataset

        read = dataset.TimedReader.run  # every read of a cut's audio goes through it

        def failing(self, fn, cut):
            if int(os.environ.get("LOCAL_RANK", 0)) == int(fail_rank):
                raise OSError(f"injected failure of {cut.id}")
            return read(self, fn, cut)

        dataset.TimedReader.run = failing
    train(load_config(config, overrides))


if __name__ == "__main__":
    main()
