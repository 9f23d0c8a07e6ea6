"""benchmarks/gpu_acceptance.py --dry-run: every phase of the one-shot GPU acceptance runs on CPU (tiny model)."""
import json
import subprocess
import sys

from tests.conftest import ROOT

PHASES = ["env", "calibrate", "eager", "mixed", "syncs", "compile"]


def test_dry_run_runs_every_phase_and_streams_json_lines(tmp_path):
    out = tmp_path / "acc"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines == [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all("phase" in line for line in lines)
    by_phase = {p: [line for line in lines if line["phase"] == p] for p in PHASES}
    for phase, found in by_phase.items():
        assert found and found[-1].get("done"), phase
        assert not any("error" in line or "skipped" in line for line in found), found
    assert by_phase["env"][0]["versions"]["torch"]
    buckets = next(line for line in by_phase["calibrate"] if line.get("summary"))["buckets"]
    assert buckets and (out / "batch_sizes.yaml").exists()
    timed_out = {line["phase"] for line in lines if line.get("timed_out")}
    if "eager" not in timed_out:
        assert {line["upper_s"] for line in by_phase["eager"] if "step_s" in line} == {u for u, _ in buckets}
    if "syncs" not in timed_out:
        syncs = by_phase["syncs"][0]
        assert syncs["host_syncs_per_step"] == 0, syncs["host_sync_ops"]
        assert any("scaled_dot_product" in k for k in syncs["sdpa_kernels"])
    if "compile" not in timed_out:
        summary = next(line for line in by_phase["compile"] if line.get("summary"))
        assert summary["graphs"] == 1 and summary["recompiles"] == 0  # every bucket shape, one graph
    assert lines[-1]["phase"] == "total" and lines[-1]["failed"] is False
