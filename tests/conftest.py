"""Shared paths and small helpers for the tests."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("NEST_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
NEMO_FIXTURES = Path(os.environ.get("NEST_NEMO_FIXTURES", ROOT.parent / "shared" / "fixtures" / "nemo"))


@pytest.fixture
def real_data() -> Path:
    """../shared/data/real (recorded speech, noise, RIRs); the test is skipped where it is absent."""
    if not (REAL_DATA / "speech").is_dir():
        pytest.skip(f"real audio not found at {REAL_DATA}")
    return REAL_DATA
