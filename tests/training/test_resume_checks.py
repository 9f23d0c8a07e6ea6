"""Start-up checks of checkpoints and of the experiment folder: a checkpoint that does not load is named with the
one to use instead; resume=auto without a checkpoint says that a new run starts; a folder whose run saved no
checkpoint is taken over by a new run."""
import logging

import pytest
import torch

from nest.config import load_config
from nest.errors import ConfigError
from nest.io.checkpoint import load_state
from nest.errors import CheckpointError
from nest.training.preflight import check_checkpoint_path, check_exp_dir, find_resume, say_if_finished


def _cfg(tmp_path, **kv):
    return load_config(None, [f"exp_dir={tmp_path / 'exp'}", *(f"{k}={v}" for k, v in kv.items())])


def _ckpts(tmp_path):
    folder = tmp_path / "exp" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(100)}}, folder / "step00000100.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(100)}}, folder / "step00000200.ckpt")
    data = (folder / "step00000200.ckpt").read_bytes()
    (folder / "step00000200.ckpt").write_bytes(data[: len(data) // 2])  # cut short too
    return folder


def test_resume_auto_without_checkpoint_says_a_new_run_starts(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert find_resume(_cfg(tmp_path, resume="auto"), tmp_path / "exp") is None
    assert any("resume=auto: no checkpoint in" in r.getMessage() and "new run starts at step 0" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("last", [b"", b"PK\x03\x04 cut"])
def test_a_broken_last_ckpt_is_named_with_the_newest_step_checkpoint_that_loads(tmp_path, last):
    folder = _ckpts(tmp_path)
    (folder / "last.ckpt").write_bytes(last)
    with pytest.raises(ConfigError) as e:
        find_resume(_cfg(tmp_path, resume="auto"), tmp_path / "exp")
    msg = str(e.value)
    assert msg.startswith(f"resume=auto: {folder / 'last.ckpt'}: not a readable PyTorch checkpoint")
    assert ("empty" if not last else "cut short") in msg
    assert f"continue from it with resume={folder / 'step00000100.ckpt'}" in msg  # 200 is cut short too


def test_a_broken_last_ckpt_without_step_checkpoints(tmp_path):
    folder = tmp_path / "exp" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="that folder holds no step checkpoint: start a new run"):
        find_resume(_cfg(tmp_path, resume="auto"), tmp_path / "exp")


def test_folders_and_random_bytes_given_as_checkpoints(tmp_path):
    (tmp_path / "exp" / "checkpoints").mkdir(parents=True)
    (tmp_path / "exp" / "checkpoints" / "last.ckpt").write_bytes(b"\x00" * 50)
    with pytest.raises(ConfigError, match=r"init_from: .*exp is a folder: give a checkpoint file such as .*last.ckpt"):
        check_checkpoint_path("init_from", str(tmp_path / "exp"))
    with pytest.raises(ConfigError, match=r"resume=.* is a folder: continue the run it holds with resume=auto"):
        _cfg(tmp_path, resume=tmp_path / "exp")
    with pytest.raises(CheckpointError, match=r"not in torch.save's format") as e:
        load_state(tmp_path / "exp" / "checkpoints" / "last.ckpt")
    assert "run code" not in str(e.value)
    with pytest.raises(ConfigError, match=r"resume: .*last.ckpt: not a readable PyTorch checkpoint"):
        find_resume(_cfg(tmp_path, resume=tmp_path / "exp" / "checkpoints" / "last.ckpt"), tmp_path / "exp")


def test_a_folder_whose_run_saved_no_checkpoint_is_taken_over(tmp_path, caplog):
    exp = tmp_path / "exp"
    (exp / "tb").mkdir(parents=True)
    (exp / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    (exp / "config.yaml").write_text("seed: 1\n")
    check_exp_dir(_cfg(tmp_path), exp, None)
    assert not (exp / "tb").exists() and (exp / "tb.no-checkpoint-1" / "events.out.tfevents.1").is_file()
    assert any("saved no checkpoint: a new run starts there" in r.getMessage() for r in caplog.records)
    (exp / "checkpoints").mkdir()
    (exp / "checkpoints" / "step00000010.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_exp_dir(_cfg(tmp_path), exp, None)


def test_an_exp_dir_that_cannot_be_a_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"exp_dir .*afile is a file: give a folder"):
        check_exp_dir(_cfg(tmp_path), tmp_path / "afile", None)
    with pytest.raises(ConfigError, match=r"exp_dir .*afile/run would be made in .*afile, which is a file"):
        check_exp_dir(_cfg(tmp_path), tmp_path / "afile" / "run", None)


def test_other_ranks_check_the_exp_dir_too_and_leave_its_logs_to_the_first(tmp_path):
    exp = tmp_path / "exp"
    (exp / "tb").mkdir(parents=True)
    (exp / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    check_exp_dir(_cfg(tmp_path), exp, None, first_rank=False)
    assert (exp / "tb" / "events.out.tfevents.1").is_file()  # moved aside by the first rank only
    (exp / "checkpoints").mkdir()
    (exp / "checkpoints" / "step00000010.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds a run"):  # every rank stops, none waits for the others
        check_exp_dir(_cfg(tmp_path), exp, None, first_rank=False)


def test_resuming_a_run_that_reached_max_steps_says_nothing_is_left_to_train(tmp_path, caplog):
    torch.save({"global_step": 20, "state_dict": {}}, tmp_path / "last.ckpt")
    say_if_finished(_cfg(tmp_path, **{"trainer.max_steps": 30}), str(tmp_path / "last.ckpt"))
    assert not caplog.records
    say_if_finished(_cfg(tmp_path, **{"trainer.max_steps": 20}), str(tmp_path / "last.ckpt"))
    assert "is at step 20, trainer.max_steps=20: nothing to train" in caplog.text
