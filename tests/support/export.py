"""What the export tests share: the NeMo-made fixtures, real speech, and our models at the fixtures' sizes."""
from pathlib import Path

import pytest
import soundfile as sf
import torch

from tests.conftest import NEMO_FIXTURES, POST_CONV_FIXTURES, ROOT, W2VBERT_FIXTURES

FIXTURES = {"nest": NEMO_FIXTURES / "nest_tiny.nemo", "w2vbert": W2VBERT_FIXTURES / "w2vbert_tiny.nemo",
            "post_conv": POST_CONV_FIXTURES / "nest_tiny_post_conv.nemo"}
SPEECH = ["spk1_snt1.wav", "spk2_snt3.wav", "spk1_snt4.wav"]  # 2.9, 1.9 and 2.5 s


def nemo_fixture(name: str) -> Path:
    """A .nemo written by NeMo 3.0.0 (../shared/fixtures/nemo*); the test is skipped where it is absent."""
    if not FIXTURES[name].is_file():
        pytest.skip(f"NeMo fixture not found: {FIXTURES[name]}")
    return FIXTURES[name]


def tiny(objective: str):
    """The model of configs/nest_tiny.yaml or configs/w2vbert_tiny.yaml: the NeMo fixtures' sizes."""
    from nest.config import load_model_config

    return load_model_config(ROOT / "configs" / f"{objective}_tiny.yaml")


def read_speech(real_data: Path) -> list[torch.Tensor]:
    """Three real utterances at 16 kHz, (S,) each."""
    return [torch.from_numpy(sf.read(real_data / "speech" / name, dtype="float32")[0]) for name in SPEECH]
