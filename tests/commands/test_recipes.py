"""Recipes: flags documented and checked, stages re-run when their inputs change, and recipes/folder
end to end from another working folder."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*/run.sh"))


def run(script: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


def corpus(root: Path, speakers: int = 5, per_speaker: int = 5, seed: int = 0) -> int:
    """Speaker folders with the same file names, and x.wav beside x.flac; returns the number of files."""
    from cuts.synth import utterance

    rng = np.random.default_rng(seed)
    n = 0
    for s in range(speakers):
        for i in range(per_speaker - (s == 0)):
            path = root / f"spk{s}" / f"{i:03d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, utterance(rng, 16000, rng.uniform(1.5, 3.5)), 16000)
            n += 1
    sf.write(root / "spk0" / "000.flac", utterance(rng, 16000, 2.0), 16000)  # same stem as spk0/000.wav
    return n + 1


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: p.parent.name)
def test_every_flag_is_documented_defaulted_and_in_help(script, tmp_path):
    text = script.read_text()
    flags = re.findall(r"^#   (--[a-z][a-z0-9-]*)", text, flags=re.M)
    assert "--work-dir" in flags and "--stage" in flags and "--help" in flags
    for flag in set(flags) - {"--help"}:
        assert re.search(rf"^{flag[2:].replace('-', '_')}=", text, flags=re.M), f"{script}: {flag} has no default"
    helped = run(script, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and all(f in helped.stdout for f in flags)
    assert "cd " not in text and not list(tmp_path.iterdir())  # no cd, nothing written for --help


@pytest.mark.parametrize("args, message", [
    (["--speech-dir", "x", "--dev-cuts", "3"], "unknown flag --dev-cuts"),
    (["--speech-dir"], "--speech-dir needs a value"),
    (["--speech-dir", "x", "train"], "unexpected argument 'train'"),
    (["--stage", "one"], "--stage must be a stage number"),
])
def test_bad_flags_fail_with_a_message(tmp_path, args, message):
    result = run(ROOT / "recipes" / "folder" / "run.sh", *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr


def test_changed_input_reruns_its_stage(tmp_path):
    corpus(tmp_path / "corpus", speakers=1, per_speaker=3)
    args = ["--speech-dir", "corpus", "--stop-stage", "1", "--jobs", "1"]
    first = run(ROOT / "recipes" / "folder" / "run.sh", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert '"num_cuts": 3' in first.stdout and (tmp_path / "data" / "folder" / ".done.1.prepare").is_file()
    again = run(ROOT / "recipes" / "folder" / "run.sh", *args, cwd=tmp_path)
    assert "stage 1 (prepare): done already" in again.stdout and "num_cuts" not in again.stdout
    sf.write(tmp_path / "corpus" / "spk0" / "new.wav", (0.1 * np.ones(32000)).astype(np.float32), 16000)
    changed = run(ROOT / "recipes" / "folder" / "run.sh", *args, cwd=tmp_path)
    assert "running it again" in changed.stdout and "now: input corpus" in changed.stdout
    assert '"num_cuts": 4' in changed.stdout


def test_no_usable_audio_stops_before_later_stages(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.wav").write_bytes(b"")
    result = run(ROOT / "recipes" / "folder" / "run.sh", "--speech-dir", "corpus", "--jobs", "1", cwd=tmp_path)
    assert result.returncode != 0 and "no usable audio" in result.stderr
    assert "stage 2" not in result.stdout and not (tmp_path / "data" / "folder" / "train.jsonl.gz").exists()


def test_folder_recipe_end_to_end_from_another_folder(tmp_path):
    n = corpus(tmp_path / "corpus")
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(2):
        sf.write(noise / f"n{i}.wav", (0.05 * np.random.default_rng(i).standard_normal(48000)).astype(np.float32), 16000)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = run(ROOT / "recipes" / "folder" / "run.sh", "--speech-dir", "../corpus", "--noise-dir", "../noise",
                 "--config", ROOT / "configs" / "nest_tiny.yaml", "--work-dir", "work", "--jobs", "1",
                 "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
                 "trainer.checkpoint_every_n_steps=3", "trainer.accelerator=cpu", "data.batch_duration=8",
                 "data.num_workers=0", "optim.warmup_steps=2", "trainer.enable_progress_bar=false", cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"trained 6 steps, [0-9.]+ h of audio seen", result.stdout)
    data = cwd / "work" / "data" / "folder"
    from lhotse import CutSet

    ids = [c.id for s in ("train", "dev") for c in CutSet.from_file(data / f"{s}.jsonl.gz")]
    assert len(ids) == len(set(ids)) == n  # every file, none lost to a duplicate id
    assert {"spk0/000.wav", "spk0/000.flac", "spk1/000", "spk2/000"} <= set(ids)
    assert (cwd / "work" / "exp" / "folder_nest" / "checkpoints" / "last.ckpt").is_file()
    assert not (ROOT / "data" / "folder").exists() and not (ROOT / "exp" / "folder_nest").exists()


def test_folder_recipe_on_the_demo_corpus(tmp_path):
    from cuts.synth import synthesize_corpus

    synthesize_corpus(tmp_path / "raw", num_utterances=60, num_noises=3, seed=1)
    cwd = tmp_path / "run"
    cwd.mkdir()
    result = run(ROOT / "recipes" / "folder" / "run.sh", "--speech-dir", "../raw/speech", "--noise-dir", "../raw/noise",
                 "--config", "nest_tiny.yaml", "--dev-fraction", "0.1", "--jobs", "1", "trainer.max_steps=3",
                 "trainer.accelerator=cpu", "data.num_workers=0", "trainer.enable_progress_bar=false", cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"trained 3 steps, [0-9.]+ h of audio seen", result.stdout)
    from lhotse import CutSet

    data = cwd / "data" / "folder"
    train, dev = (CutSet.from_file(data / f"{s}.jsonl.gz") for s in ("train", "dev"))
    assert len(train) + len(dev) == 60 and len(dev) == 6  # speech/train/* and speech/dev/*: every file kept
    assert all(c.id.split("/")[0] in ("train", "dev") for c in [*train, *dev])  # ids keep their folder


def test_folder_recipe_on_one_minute_of_speech_trains_and_says_the_corpus_is_tiny(tmp_path):
    n = corpus(tmp_path / "corpus", speakers=5, per_speaker=5)  # 25 files, about a minute
    result = run(ROOT / "recipes" / "folder" / "run.sh", "--speech-dir", "corpus", "--config", "nest_tiny.yaml",
                 "--jobs", "1", "trainer.max_steps=2", "trainer.accelerator=cpu", "data.num_workers=0",
                 "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert n == 25 and "the corpus is tiny for data.batch_duration=40 s" in result.stderr
    assert re.search(r"trained 2 steps, [0-9.]+ h of audio seen", result.stdout)
    import yaml

    bins = yaml.safe_load((tmp_path / "data" / "folder" / "bins.yaml").read_text())
    assert bins["num_buckets"] == 1 and bins["batch_duration"] == 40
