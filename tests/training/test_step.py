"""The training step: no host sync outside logging steps, exact skips, out-of-memory retry, logging devices."""
import datetime

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nest.config import load_config
from nest.objectives import NestModel, NestOutput
from nest.training.module import NestLightningModule
from nest.training.run import SyncBatchNormPlugin, build_trainer, train, trainer_options
from nest.training.step import norm_buffers
from nest.training.sync_batchnorm import SyncedBatchNorm, convert_batchnorm
from tests.conftest import ROOT, tiny_overrides

SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal"}


class CountSyncs(TorchDispatchMode):
    """Ops that read device data on the host (on a GPU each would wait for the device)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def run(tiny_corpus, exp, **extra):
    values = {"data.num_workers": 0, "data.val_cuts": "[]", "trainer.checkpoint_every_n_steps": 1, **extra}
    return train(load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(tiny_corpus, exp, **values)))


def poison(monkeypatch, micro_batches: set):
    """Make the loss of the given micro-batches (counted from 1) non-finite, and BatchNorm statistics with it."""
    seen = {"n": 0}
    forward = NestLightningModule.forward

    def poisoned(self, batch):
        out = forward(self, batch)
        if self.training:
            seen["n"] += 1
            if seen["n"] in micro_batches:
                for m in norm_buffers(self.model):
                    m.data.add_(float("nan")) if m.is_floating_point() else None  # as a NaN forward would
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(NestLightningModule, "forward", poisoned)


def test_steps_make_no_host_sync_outside_logging_steps(tiny_corpus, tmp_path, monkeypatch):
    poison(monkeypatch, {3})  # the non-finite guard's path included
    counts = []
    step = NestLightningModule.training_step

    def counted(self, batch, batch_idx):
        logging_step = self.is_logging_step()
        with CountSyncs() as c:
            step(self, batch, batch_idx)
        counts.append((logging_step, c.ops))

    monkeypatch.setattr(NestLightningModule, "training_step", counted)
    summary = run(tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 6, "trainer.log_every_n_steps": 4,
                                                  "trainer.checkpoint_every_n_steps": 100})
    assert [log for log, _ in counts] == [False, False, False, True, False, False]
    assert all(ops == [] for log, ops in counts if not log), counts
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6


def test_a_skipped_window_changes_no_weight_statistic_or_optimizer_state(tiny_corpus, tmp_path, monkeypatch):
    poison(monkeypatch, {4})  # accumulation 2: window 2 is micro-batches 3 and 4
    run(tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 3, "trainer.accumulate_grad_batches": 2,
                                          "trainer.log_every_n_steps": 1})
    ckpts = tmp_path / "exp" / "checkpoints"
    one, two, three = (torch.load(ckpts / f"step0000000{i}.ckpt", weights_only=True) for i in (1, 2, 3))
    for k, v in one["state_dict"].items():
        if "running_" in k or "num_batches" in k:  # statistics of the window's finite micro-batch may move
            assert torch.isfinite(two["state_dict"][k].float()).all(), k
        else:
            assert torch.equal(v, two["state_dict"][k]), k
    assert any(not torch.equal(v, three["state_dict"][k]) for k, v in one["state_dict"].items())
    s1, s2 = one["optimizer_states"][0]["state"], two["optimizer_states"][0]["state"]
    for i in s1:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1[i][name], s2[i][name]), (i, name)
    assert two["nest_totals"]["skipped_steps"] == 1


def test_guard_covers_every_batchnorm_kind():
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    model = NestModel(cfg)
    plain = norm_buffers(model)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert len(norm_buffers(synced)) == len(plain) == 3 * cfg.encoder.n_layers  # mean, var, count per layer
    ours = convert_batchnorm(NestModel(cfg))
    assert any(isinstance(m, SyncedBatchNorm) for m in ours.modules()) and len(norm_buffers(ours)) == len(plain)


def test_out_of_memory_step_is_retried_as_two_halves(tiny_corpus, tmp_path, monkeypatch):
    calls = {"full": 0}
    forward = NestModel.forward

    def tight(self, audio, *args, **kwargs):
        if self.training and audio.shape[0] > 1 and calls["full"] == 0:
            calls["full"] += 1
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return forward(self, audio, *args, **kwargs)

    monkeypatch.setattr(NestModel, "forward", tight)
    summary = run(tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 3, "trainer.log_every_n_steps": 1})
    assert summary["oom_retries"] == 1 and summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert summary["last_loss"] is not None


def test_metrics_stay_on_the_outputs_device():
    B, T, C, N = 2, 5, 7, 3
    out = NestOutput(log_probs=torch.zeros(B, T, C, N, device="meta"), encoded_lens=torch.zeros(B, device="meta"),
                     tokens=torch.zeros(B, T, N, dtype=torch.long, device="meta"),
                     frame_mask=torch.zeros(B, 8 * T, dtype=torch.bool, device="meta"),
                     token_mask=torch.zeros(B, T, dtype=torch.bool, device="meta"), loss=torch.zeros((), device="meta"))
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    cfg.quantizer.num_classes, cfg.quantizer.num_books = C, N
    with torch.device("meta"):
        model = NestModel(cfg)
    assert {v.device.type for v in model.metrics(out).values()} == {"meta"}


def test_logged_values_are_numbers_or_tensors_of_the_module_device(tiny_corpus, tmp_path, monkeypatch):
    logged = []
    log = NestLightningModule.log

    def spy(self, name, value, *args, **kwargs):
        logged.append((name, value, self.device))
        return log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(NestLightningModule, "log", spy)
    run(tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 2, "trainer.log_every_n_steps": 1,
                                          "data.val_cuts": f"[{tiny_corpus['dev']}]", "trainer.val_check_interval": 2,
                                          "trainer.limit_val_batches": 1})
    assert any(name.startswith("val/") for name, _, _ in logged)
    for name, value, device in logged:
        assert isinstance(value, float) or (isinstance(value, torch.Tensor) and value.device == device), name


def test_sync_batchnorm_is_the_plugin_on_every_accelerator_and_strategy(tmp_path):
    for strategy in ("auto", "ddp"):
        cfg = load_config(None, [f"trainer.strategy={strategy}", "trainer.devices=8"])
        for cuda, precision in ((True, "bf16-mixed"), (False, "32-true")):
            options = trainer_options(cfg, cuda=cuda)
            assert options["precision"] == precision and options["sync_batchnorm"] is False  # not torch's layers
            assert [type(p) for p in options["plugins"]] == [SyncBatchNormPlugin]
    assert trainer_options(load_config(None, ["trainer.sync_batchnorm=false"]), cuda=True)["plugins"] == []
    cfg = load_config(None, ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=auto",
                             "trainer.ddp_timeout_minutes=7", f"exp_dir={tmp_path}"])
    strategy = build_trainer(cfg, tmp_path).strategy  # auto on several devices: DDP, with the plugin and our options
    assert type(strategy).__name__ == "DDPStrategy" and isinstance(strategy._layer_sync, SyncBatchNormPlugin)
    assert strategy._ddp_kwargs == {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    assert strategy._timeout == datetime.timedelta(minutes=7)


def test_gradient_clipping_works_under_bf16_mixed(tiny_corpus, tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it assumes GradScaler's unscaling
    inside the step); bf16 has no scaler, and the guarded step clips with torch directly."""
    summary = run(tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 2, "trainer.log_every_n_steps": 1,
                                                  "trainer.precision": "bf16-mixed", "trainer.gradient_clip_val": 1.0})
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and summary["last_loss"] is not None
