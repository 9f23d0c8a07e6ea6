"""Shared paths and small helpers for the tests."""
import os
from pathlib import Path

import pytest
from hypothesis import settings

# `make test` draws the same examples on every run (a commit's result does not depend on luck);
# HYPOTHESIS_PROFILE=explore draws new ones, to search for failures before committing.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("NEST_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
NEMO_FIXTURES = Path(os.environ.get("NEST_NEMO_FIXTURES", ROOT.parent / "shared" / "fixtures" / "nemo"))
# Written by tests/nemo_fixtures/make_post_conv.py (run under NeMo's interpreter; see its docstring).
POST_CONV_FIXTURES = Path(os.environ.get("NEST_POST_CONV_FIXTURES", NEMO_FIXTURES.parent / "nemo_post_conv"))
W2VBERT_FIXTURES = Path(os.environ.get("NEST_W2VBERT_FIXTURES", ROOT.parent / "shared" / "fixtures" / "nemo_w2vbert"))


@pytest.fixture
def real_data() -> Path:
    """../shared/data/real (recorded speech, noise, RIRs); the test is skipped where it is absent."""
    if not (REAL_DATA / "speech").is_dir():
        pytest.skip(f"real audio not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """A small synthetic corpus, prepared once: train/dev CutSets, a noise CutSet and bins."""
    from lhotse import CutSet

    from cuts.bins import estimate_bins
    from cuts.prepare import prepare_audio_dir
    from cuts.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("tiny_corpus")
    synthesize_corpus(root / "raw", num_utterances=40, num_noises=4, seed=3)
    prepare_audio_dir(root / "raw" / "speech" / "train", root / "train", min_duration=0.5)
    prepare_audio_dir(root / "raw" / "speech" / "dev", root / "dev", min_duration=0.5)
    prepare_audio_dir(root / "raw" / "noise", root / "noise", window=10.0)
    bins, _ = estimate_bins(CutSet.from_jsonl_lazy(root / "train" / "cuts.jsonl.gz"), 4)
    bins.save(root / "bins.yaml")
    return {
        "root": root,
        "train": root / "train" / "cuts.jsonl.gz",
        "dev": root / "dev" / "cuts.jsonl.gz",
        "noise": root / "noise" / "cuts.jsonl.gz",
        "bins": root / "bins.yaml",
    }


def tiny_overrides(corpus: dict, exp_dir, **extra) -> list[str]:
    """key=value overrides of configs/nest_tiny.yaml for a short run on ``tiny_corpus``."""
    values = {
        "data.train_cuts": f"[{corpus['train']}]",
        "data.val_cuts": f"[{corpus['dev']}]",
        "data.noise_cuts": f"[{corpus['noise']}]",
        "data.bins": str(corpus["bins"]),
        "data.batch_duration": 20,
        "trainer.enable_progress_bar": "false",
        "exp_dir": str(exp_dir),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]
