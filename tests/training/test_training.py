"""train.py's lifecycle on CPU: checkpoints, TensorBoard metrics, kill and resume, init_from, extraction."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lhotse import CutSet

from nest.config import load_config
from nest.errors import ConfigError
from nest.extract import extract, load_pretrained_encoder
from nest.training.run import train
from tests.conftest import NEMO_FIXTURES, tiny_overrides
from tests.support.runs import trace_run

ROOT = Path(__file__).resolve().parents[2]


def read_trace(path: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run replays the steps after its checkpoint)."""
    steps = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec
    return steps


def test_sigkill_then_resume_auto_repeats_the_uninterrupted_run(tiny_corpus, tmp_path):
    common = dict(**{"trainer.max_steps": 10, "trainer.checkpoint_every_n_steps": 4,
                     "trainer.val_check_interval": 5, "trainer.limit_val_batches": 2, "data.num_workers": 1})
    assert trace_run(tmp_path / "a.jsonl", -1, tiny_overrides(tiny_corpus, tmp_path / "a", **common)) == 0
    b = tiny_overrides(tiny_corpus, tmp_path / "b", **common, resume="auto")
    assert trace_run(tmp_path / "b.jsonl", 6, b) == -9  # killed after step 6; last checkpoint at step 4
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / "b" / "checkpoints").glob(".*.tmp"))
    assert trace_run(tmp_path / "b.jsonl", -1, b) == 0
    a, b = read_trace(tmp_path / "a.jsonl"), read_trace(tmp_path / "b.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 11))  # optimizer steps done after each batch
    for step in a:
        assert a[step]["cut_ids"] == b[step]["cut_ids"], step
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=1e-6), step


def test_short_run_writes_checkpoints_and_metrics(tiny_corpus, tmp_path):
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 8, "trainer.checkpoint_every_n_steps": 2,
                                          "trainer.keep_last": 2, "trainer.val_check_interval": 3,
                                          "trainer.log_every_n_steps": 1, "trainer.limit_val_batches": 2,
                                          "data.num_workers": 0}))
    summary = train(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "exp" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["best.ckpt", "last.ckpt", "step00000006.ckpt", "step00000008.ckpt"]  # the last 2 step ones
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "exp" / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "val_loss", "train/lr", "train/masked_accuracy", "train/target_perplexity",
                "train/masked_fraction", "train/padding_ratio", "train/audio_s_per_s", "train/data_wait_s",
                "train/failed_cuts", "train/audio_seconds", "train/skipped_steps"):
        assert tag in tags, (tag, sorted(tags))
    assert "hp_metric" not in tags and not [t for t in tags if "lr" in t and t != "train/lr"]  # the rate once
    # Written by the module as numbers, at Lightning's own step count (the one validation is logged at).
    assert [e.step for e in events.Scalars("train/loss")] == list(range(8))
    assert [e.step for e in events.Scalars("val_loss")] == [2, 5]
    assert summary["steps"] == 8 and summary["audio_hours_seen"] > 0 and summary["failed_cuts"] == 0
    assert summary["first_loss"] > summary["last_loss"] > 0


def test_resume_keeps_best_the_true_best_and_the_summary_whole(tiny_corpus, tmp_path):
    common = {"trainer.val_check_interval": 2, "trainer.limit_val_batches": 2, "trainer.checkpoint_every_n_steps": 2,
              "trainer.log_every_n_steps": 2, "data.num_workers": 0, "resume": "auto"}
    first = train(load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", **common, **{"trainer.max_steps": 4})))
    both = train(load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", **common, **{"trainer.max_steps": 8})))
    ckpts = tmp_path / "exp" / "checkpoints"
    assert not list(ckpts.glob("*-v*.ckpt"))  # no best-v1.ckpt, no last-v1.ckpt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vals = [e.value for e in EventAccumulator(str(tmp_path / "exp" / "tb")).Reload().Scalars("val_loss")]
    assert len(vals) == 4
    best = torch.load(ckpts / "best.ckpt", weights_only=True)
    state = next(v for k, v in best["callbacks"].items() if "val_loss" in k)
    assert float(state["best_model_score"]) == pytest.approx(min(vals), rel=1e-6)
    assert both["steps"] == 8 and both["first_loss"] == first["first_loss"]  # the summary spans both parts
    assert both["audio_hours_seen"] > first["audio_hours_seen"] * 1.5


@pytest.mark.skipif(not (NEMO_FIXTURES / "nest_tiny.nemo").is_file(), reason="no NeMo fixture")
def test_init_from_nemo_loads_and_trains(tiny_corpus, tmp_path):
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 2, "data.num_workers": 0,
                                          "init_from": str(NEMO_FIXTURES / "nest_tiny.nemo")}))
    from nest.io import load_nemo
    from nest.training.step import StepOptions
    from nest.training.module import make_module
    from nest.training.run import initialize

    module = make_module(cfg.model, cfg.optim, StepOptions(), 0)
    initialize(module, cfg)
    _, state = load_nemo(cfg.init_from)
    assert torch.equal(module.model.encoder.layers[1].self_attn.linear_q.weight,
                       state["encoder.layers.1.self_attn.linear_q.weight"])
    assert train(cfg)["steps"] == 2


def test_init_from_with_include_pattern(tiny_corpus, tmp_path):
    if not (NEMO_FIXTURES / "nest_tiny.nemo").is_file():
        pytest.skip("no NeMo fixture")
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", init_from=str(NEMO_FIXTURES / "nest_tiny.nemo"),
        init_include="[encoder.*]", **{"model.quantizer.num_classes": 32}))
    from nest.training.step import StepOptions
    from nest.training.module import make_module
    from nest.training.run import initialize

    module = make_module(cfg.model, cfg.optim, StepOptions(), 0)
    before = module.model.decoder.decoder_layers[0].weight.clone()
    initialize(module, cfg)  # decoder shape differs (32 classes) but only encoder.* is loaded
    assert torch.equal(module.model.decoder.decoder_layers[0].weight, before)


def test_extraction_writes_one_array_per_cut_and_layer(tiny_corpus, tmp_path):
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 1, "data.num_workers": 0}))
    train(cfg)
    ckpt = tmp_path / "exp" / "checkpoints" / "last.ckpt"
    cuts = CutSet.from_file(tiny_corpus["dev"]).subset(first=3)
    assert extract(str(ckpt), cuts, tmp_path / "feats", layers="all", batch_size=2) == 3
    encoder = load_pretrained_encoder(ckpt).eval()
    for cut in cuts:
        audio = torch.from_numpy(cut.resample(16000).load_audio()[0])[None]
        ref, ref_lens = encoder(audio, torch.tensor([audio.shape[1]]))
        for layer in (0, 1):
            arr = np.load(tmp_path / "feats" / f"layer{layer}" / f"{cut.id}.npy")
            assert arr.shape == (int(ref_lens[0]), 64)
        assert np.allclose(arr, ref[0, :, : ref_lens[0]].T.detach().numpy(), atol=1e-4)
    assert extract(str(ckpt), cuts, tmp_path / "lh", layers="-1", fmt="lhotse") == 3
    with_feats = CutSet.from_file(tmp_path / "lh" / "cuts_with_features.jsonl.gz")
    for cut in with_feats:
        assert cut.load_custom("layer_1").shape[1] == 64


def test_failures_before_training(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        train(load_config(ROOT / "configs" / "nest_tiny.yaml",
                          tiny_overrides(tiny_corpus, tmp_path, **{"data.train_cuts": f"[{tmp_path}/none.jsonl.gz]"})))
    empty = tmp_path / "empty.jsonl.gz"
    CutSet([]).to_file(empty)
    with pytest.raises(ConfigError, match="holds no cuts"):
        train(load_config(ROOT / "configs" / "nest_tiny.yaml",
                          tiny_overrides(tiny_corpus, tmp_path, **{"data.train_cuts": f"[{empty}]"})))
    assert not (tmp_path / "checkpoints").exists()


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_corpus, tmp_path, monkeypatch):
    from nest.training import module as lightning
    from nest.errors import NonFiniteLossError

    calls = {"n": 0}
    forward = lightning.NestLightningModule.forward

    def poisoned(self, batch):
        out = forward(self, batch)
        calls["n"] += 1
        if self.training and calls["n"] > 2:
            for m in self.model.modules():  # as a real NaN batch would, through the forward pass
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.running_mean.data.fill_(float("nan"))
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(lightning.NestLightningModule, "forward", poisoned)
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 20, "trainer.max_bad_steps": 3, "data.num_workers": 0,
                                          "trainer.checkpoint_every_n_steps": 1, "trainer.keep_last": -1,
                                          "trainer.log_every_n_steps": 1, "data.val_cuts": "[]"}))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(cfg)
    good = torch.load(tmp_path / "exp" / "checkpoints" / "step00000002.ckpt", weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "exp" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in last.items():  # skipped steps change no weight and no normalization statistic
        assert torch.isfinite(v.float()).all(), k
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, good[k]), k


def test_validation_with_nothing_masked_reports_no_loss_of_zero(tiny_corpus, tmp_path, caplog):
    """val_loss over batches where no frame was masked is not 0 (which would make any such round the best)."""
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 2, "trainer.val_check_interval": 2,
                                          "trainer.limit_val_batches": 2, "data.num_workers": 0,
                                          "model.masking.mask_prob": 0.0}))
    train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "exp" / "tb")).Reload()
    vals = [e.value for e in events.Scalars("val_loss")]
    assert vals and all(v == float("inf") for v in vals)
    accuracy = [e.value for e in events.Scalars("val/masked_accuracy")]  # no value, not an accuracy of 0
    assert accuracy and all(math.isnan(v) for v in accuracy)
    assert all(0 < e.value < math.inf for e in events.Scalars("val/target_perplexity"))  # over every frame
    assert "no frame of the" in caplog.text and "was masked" in caplog.text
