"""The whole path in miniature: prepare -> bins -> a few train steps with noise -> checkpoint -> reload."""
import json
import shutil
from pathlib import Path

import torch

from cuts.bins import estimate_bins
from cuts.prepare import prepare_audio_dir
from cuts.synth import synthesize_corpus
from lhotse import CutSet
from nest.io import load_model
from nest.config import load_config
from nest.training.run import train

ROOT = Path(__file__).resolve().parents[2]


def run_pipeline(speech_dir: Path, noise_dir: Path, tmp: Path, steps: int = 4) -> dict:
    prepare_audio_dir(speech_dir, tmp / "train", min_duration=0.5)
    prepare_audio_dir(noise_dir, tmp / "noise", window=10.0)
    cuts = CutSet.from_jsonl_lazy(tmp / "train" / "cuts.jsonl.gz")
    bins, _ = estimate_bins(cuts, 4)
    bins.save(tmp / "bins.yaml")
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", [
        f"data.train_cuts=[{tmp / 'train' / 'cuts.jsonl.gz'}]",
        f"data.val_cuts=[{tmp / 'train' / 'cuts.jsonl.gz'}]",
        f"data.noise_cuts=[{tmp / 'noise' / 'cuts.jsonl.gz'}]",
        f"data.bins={tmp / 'bins.yaml'}",
        "data.num_workers=0", "data.noise.prob=1.0", "data.max_duration=20",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", f"exp_dir={tmp / 'exp'}",
    ])
    summary = train(cfg)
    ckpt = tmp / "exp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (tmp / "exp" / "config.yaml").is_file()
    model = load_model(ckpt)
    audio = torch.randn(2, 16000) * 0.1
    encoded, lens = model.encode(audio, torch.tensor([16000, 12000]))
    assert encoded.shape == (2, 64, 14) and lens.tolist() == [13, 10]  # 100 frames padded to 112
    assert torch.isfinite(encoded).all()
    return summary


def test_pipeline_on_generated_audio(tmp_path):
    synthesize_corpus(tmp_path / "raw", num_utterances=12, num_noises=3, seed=1)
    summary = run_pipeline(tmp_path / "raw" / "speech", tmp_path / "raw" / "noise", tmp_path)
    assert summary["steps"] == 4
    assert summary["audio_hours_seen"] > 0
    assert summary["first_loss"] == summary["first_loss"]  # not NaN


def test_pipeline_on_real_audio(tmp_path, real_data):
    speech = tmp_path / "speech"
    shutil.copytree(real_data / "speech", speech)  # a scratch copy inside the test's tmp dir
    summary = run_pipeline(speech, real_data / "noise", tmp_path, steps=3)
    assert summary["steps"] == 3
    rejected = [json.loads(line) for line in (tmp_path / "train" / "rejected.jsonl").read_text().splitlines()]
    assert not rejected, rejected  # every real file is usable, whatever its format and rate
    cuts = CutSet.from_file(tmp_path / "train" / "cuts.jsonl.gz")
    assert {c.sampling_rate for c in cuts} >= {16000, 22050}
