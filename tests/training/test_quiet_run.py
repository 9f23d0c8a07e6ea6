"""A run prints what concerns the user and nothing else: no library noise, no loss for a step without one."""
import subprocess
import sys

import torch

from nest.config import load_config
from nest.objectives import build_model
from nest.training.meters import RunMeters, weighted
from tests.conftest import ROOT


def test_third_party_info_lines_are_quiet_ours_are_not():
    code = ("import logging; from nest.train_cli import configure_logging; configure_logging(); "
            "logging.info('Using audioread. Available backends: []'); logging.getLogger('nest.x').info('ours'); "
            "logging.getLogger('pytorch_lightning.utilities.rank_zero').info('GPU available: False'); "
            "import nest.training.run; "
            "logging.getLogger('pytorch_lightning.utilities.rank_zero').info('Tip: try installing [litlogger]')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ours" in r.stderr and "GPU available" in r.stderr
    assert "audioread" not in r.stderr and "litlogger" not in r.stderr


def test_a_batch_with_nothing_masked_has_no_loss_to_log():
    for config in ("nest_tiny.yaml", "w2vbert_tiny.yaml"):
        model = build_model(load_config(ROOT / "configs" / config).model)
        audio = 0.1 * torch.randn(2, 16000)
        lens = torch.tensor([16000, 12000])
        drawn = model(audio, lens, audio, lens)
        kw = {"frame_mask": torch.zeros_like(drawn.frame_mask)}
        if hasattr(drawn, "freq_mask"):
            kw["freq_mask"] = torch.zeros_like(drawn.freq_mask)
        bare = model(audio, lens, audio, lens, **kw)
        kw["frame_mask"] = kw["frame_mask"].clone()
        kw["frame_mask"][:, 8:48] = True  # one block of 40 frames, in both utterances
        masked = model(audio, lens, audio, lens, **kw)
        assert bool(model.has_loss(masked)) and not bool(model.has_loss(bare)), config
        # what validation leaves out for a batch without a loss: metrics over masked frames, which read 0 there
        per_mask = {k: v for k, v in model.metrics(bare).items() if k in model.masked_metrics}
        assert per_mask and all(float(v) == 0 for v in per_mask.values()), (config, per_mask)
        assert model.masked_metrics <= set(model.metrics(masked)), config
    meters = RunMeters()

    class Batch:  # what the meters read of an AudioNoiseBatch
        audio = torch.zeros(2, 16000)
        audio_seconds, num_failed, failed = 1.5, 0, []

        def __len__(self):
            return 2

    meters.add_batch(Batch(), 16000, torch.tensor(0.0), torch.tensor(False), 1.0, 0)
    report = meters.log(torch.device("cpu"), torch.zeros(()), torch.zeros(()), 1e-3, {}, 1.0)
    assert report.mean_loss is None and "train/loss" not in report.metrics


def test_a_weight_of_zero_adds_nothing_even_to_a_nan():
    nan = torch.tensor(float("nan"))
    assert float(weighted(nan, 0.0)) == 0 and float(weighted(nan, torch.tensor(0.0))) == 0
    assert float(weighted(torch.tensor(0.5), torch.tensor(4.0))) == float(weighted(torch.tensor(0.5), 4.0)) == 2.0
    assert torch.isnan(weighted(nan, torch.tensor(1.0)))  # a measured nan stays visible
