"""Training runs in a subprocess (tests/support/trace_train.py), with every step traced to a JSON-lines file."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def ddp_run(trace: Path, overrides: list[str], kill_at: int = -1, env=None, timeout: int = 600):
    """Run training (any world size) with a trace; SIGKILLed at ``kill_at`` optimizer steps when >= 0."""
    r = subprocess.run([sys.executable, "-m", "tests.support.trace_train", str(trace), str(kill_at), *overrides],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if r.returncode not in (0, -9):
        raise AssertionError(r.stderr[-4000:])
    return r


def trace_run(trace: Path, kill_at: int, overrides: list[str]) -> int:
    """``ddp_run``'s exit status: 0, or -9 when killed at ``kill_at``."""
    return ddp_run(trace, overrides, kill_at).returncode


def records(trace: Path) -> list[dict]:
    return [json.loads(line) for line in trace.read_text().splitlines()]
