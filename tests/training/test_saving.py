"""Checkpoints where every rank agrees: at window ends only, on a timer, on SIGUSR1, and at the end of training."""
import hashlib
import json

import torch

from tests.conftest import tiny_overrides
from tests.support.runs import ddp_run, records


def run(tiny_corpus, exp, trace, kill_at=-1, env=None, **extra):
    values = {"data.val_cuts": "[]", "trainer.accelerator": "cpu", "data.num_workers": 0,
              "trainer.log_every_n_steps": 2, "trainer.checkpoint_every_n_steps": 100, **extra}
    return ddp_run(trace, tiny_overrides(tiny_corpus, exp, **values), kill_at=kill_at, env=env)


def step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_the_last_step_is_saved_when_max_steps_is_not_a_multiple_of_the_interval(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path / "exp", tmp_path / "t.jsonl", **{"trainer.max_steps": 5, "trainer.checkpoint_every_n_steps": 2})
    assert step_of(tmp_path / "exp" / "checkpoints" / "last.ckpt") == 5


def test_the_timer_refreshes_last_ckpt_during_training(tiny_corpus, tmp_path):
    # SIGKILL after step 5: without the timer nothing would be saved (checkpoint_every_n_steps=100).
    run(tiny_corpus, tmp_path / "exp", tmp_path / "t.jsonl", kill_at=5,
        **{"trainer.max_steps": 8, "trainer.checkpoint_every_minutes": 1e-6})
    assert step_of(tmp_path / "exp" / "checkpoints" / "last.ckpt") == 4  # the last logging step before the kill


def test_sigusr1_saves_at_a_window_end_stops_and_resumes_exactly(tiny_corpus, tmp_path):
    opts = {"trainer.max_steps": 8, "trainer.accumulate_grad_batches": 2}
    run(tiny_corpus, tmp_path / "ref", tmp_path / "ref.jsonl", **opts)
    exp = tmp_path / "exp"
    run(tiny_corpus, exp, tmp_path / "t.jsonl", env={"NEST_TEST_SIGUSR1_AT": "3"}, **opts)
    assert step_of(exp / "checkpoints" / "last.ckpt") == 4  # the window after the signal ends at step 4
    assert json.loads((exp / "summary.json").read_text())["stopped_by"] == "SIGUSR1"
    run(tiny_corpus, exp, tmp_path / "t.jsonl", **opts, resume="auto")
    assert [r["cut_ids"] for r in records(tmp_path / "t.jsonl")] == [r["cut_ids"] for r in records(tmp_path / "ref.jsonl")]


def test_a_resumed_run_saves_no_step_checkpoint_in_the_middle_of_a_window(tiny_corpus, tmp_path):
    opts = {"trainer.accumulate_grad_batches": 2, "trainer.checkpoint_every_n_steps": 2}
    exp = tmp_path / "exp"
    run(tiny_corpus, exp, tmp_path / "t.jsonl", **opts, **{"trainer.max_steps": 4})
    digest = lambda: hashlib.sha256((exp / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()  # noqa: E731
    before = digest()
    # SIGKILL after the first micro-batch of the resumed run (global_step still 4).
    run(tiny_corpus, exp, tmp_path / "t.jsonl", kill_at=4, **opts, **{"trainer.max_steps": 8}, resume="auto")
    assert digest() == before
