"""Configuration: YAML + key=value merge, and start-up errors that name the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from nest.config import load_config
from nest.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_and_overrides_merge():
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", ["trainer.max_steps=7", "data.noise.snr=[0,10]"])
    assert cfg.trainer.max_steps == 7
    assert cfg.data.noise.snr == [0.0, 10.0]
    assert cfg.model.encoder.d_model == 64


def test_preset_then_overrides():
    cfg = load_config(ROOT / "configs" / "nest_fast-conformer.yaml", ["model.preset=small", "model.encoder.n_layers=3"])
    assert cfg.model.encoder.d_model == 176 and cfg.model.encoder.n_layers == 3
    assert cfg.optim.weight_decay == 1e-3  # the YAML's value wins over the preset's
    cfg = load_config(None, ["model.preset=small"])
    assert cfg.optim.weight_decay == 0.0


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"data\.batch_durration.*data\.batch_duration"):
        load_config(None, ["data.batch_durration=10"])
    with pytest.raises(ConfigError, match=r"model\.encoder\.d_modl.*model\.encoder\.d_model"):
        load_config(None, ["model.encoder.d_modl=10"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps"):
        load_config(None, ["trainer.max_steps=many"])


def test_bad_value_fails():
    with pytest.raises(ConfigError, match="n_heads"):
        load_config(None, ["model.encoder.d_model=100", "model.encoder.n_heads=8"])


def test_train_cli_fails_fast_on_bad_key_and_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/nest_tiny.yaml", "trainer.max_stepz=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "trainer.max_steps" in r.stderr
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/nest_tiny.yaml",
                        f"data.train_cuts=[{tmp_path}/nope.jsonl.gz]"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "nope.jsonl.gz does not exist" in r.stderr


def test_train_help_lists_every_section():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for section in ("data:", "model:", "optim:", "trainer:", "noise:", "encoder:"):
        assert section in r.stdout
