"""Start-up: each configuration mistake fails before training with a message naming the key and the fix."""
import json
import subprocess
import sys

import pytest
import soundfile as sf

from nest.config import describe, field_help, load_config, RunConfig
from nest.errors import ConfigError
from nest.training.preflight import check_trainer_names
from nest.training.run import train
from tests.conftest import NEMO_FIXTURES, ROOT, tiny_overrides


def tiny(corpus, exp, **extra):
    return load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(corpus, exp, **extra))


def test_a_list_key_takes_one_path(tiny_corpus, tmp_path):
    cfg = load_config(None, [f"data.train_cuts={tiny_corpus['train']}", "data.noise_cuts=x.jsonl.gz"])
    assert cfg.data.train_cuts == [str(tiny_corpus["train"])] and cfg.data.noise_cuts == ["x.jsonl.gz"]


@pytest.mark.parametrize("override, key, fix", [
    ("data.noise.prob=1.5", "data.noise.prob", "[0, 1]"),
    ("model.masking.mask_prob=-0.1", "model.masking.mask_prob", "[0, 1]"),
    ("data.batch_duration=0", "data.batch_duration", "> 0"),
    ("data.max_duration=-3", "data.max_duration", "> 0"),
    ("data.noise.snr=[20,-5]", "data.noise.snr", "low <= high"),
    ("trainer.strategy=dpp", "trainer.strategy", "ddp"),
    ("trainer.accelerator=gpus", "trainer.accelerator", "cuda"),
    ("trainer.precision=fp8", "trainer.precision", "bf16-mixed"),
    ("trainer.precision=bf16-true", "trainer.precision", "bf16-mixed"),
    ("trainer.precision=16-mixed", "trainer.precision", "bf16-mixed"),
    ("trainer.strategy=fsdp", "trainer.strategy", "ddp"),
    ("trainer.strategy=ddp_spawn", "trainer.strategy", "ddp"),
    ("trainer.keep_last=-5", "trainer.keep_last", "-1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches", ">= 1"),
    ("data.num_workers=-1", "data.num_workers", "auto or an integer"),
    ("data.num_workers=many", "data.num_workers", "auto or an integer"),
    ("data.noise_bank_seconds=600", "data.noise_bank_seconds", "data.mix_on_device=true"),
])
def test_values_out_of_range_name_key_and_range(override, key, fix):
    with pytest.raises(ConfigError) as e:
        check_trainer_names(load_config(None, [override]))  # names only Lightning knows are checked at start-up
    assert key in str(e.value) and fix in str(e.value)


def test_help_gives_every_key_a_meaning():
    text = describe()
    for line in text.splitlines():
        assert "#" in line and line.split("#", 1)[1].strip(), line
    assert "data.max_failed_fraction" not in text and "max_failed_fraction:" in text
    assert set(field_help(RunConfig)) >= {"exp_dir", "init_model_config", "resume"}


def test_audio_folder_and_nemo_manifest_given_as_cuts_say_which_command(tmp_path):
    audio = tmp_path / "my_corpus" / "spk1"
    audio.mkdir(parents=True)
    sf.write(audio / "001.wav", [0.1] * 16000, 16000)
    with pytest.raises(ConfigError, match=r"data.train_cuts: .*my_corpus is an audio folder.*nest-prepare audio-dir"):
        train(load_config(None, [f"data.train_cuts={tmp_path / 'my_corpus'}", f"exp_dir={tmp_path / 'e'}"]))
    nemo = tmp_path / "train.json"
    nemo.write_text(json.dumps({"audio_filepath": str(audio / "001.wav"), "duration": 1.0}) + "\n")
    with pytest.raises(ConfigError, match=r"data.train_cuts: .*train.json is a NeMo manifest.*nest-prepare nemo-manifest"):
        train(load_config(None, [f"data.train_cuts={nemo}", f"exp_dir={tmp_path / 'e'}"]))
    from cuts.prepare import prepare_audio_dir

    prepare_audio_dir(tmp_path / "my_corpus", tmp_path / "cuts")
    with pytest.raises(ConfigError, match=r"data.noise_cuts: .*my_corpus is an audio folder.*nest-prepare noise"):
        train(load_config(None, [f"data.train_cuts={tmp_path / 'cuts' / 'cuts.jsonl.gz'}",
                                 f"data.noise_cuts={tmp_path / 'my_corpus'}", f"exp_dir={tmp_path / 'e'}"]))
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "cuts.jsonl.gz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"prepared is a prepared folder: give the manifest in it, .*cuts.jsonl.gz"):
        train(load_config(None, [f"data.train_cuts={prepared}", f"exp_dir={tmp_path / 'e'}"]))


def run_cli(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "configs/nest_tiny.yaml", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_no_batch_is_the_last_line(tiny_corpus, tmp_path):
    r = run_cli(tiny_overrides(tiny_corpus, tmp_path / "exp", **{"data.min_duration": 19.0, "data.max_duration": 20.0}),
                tmp_path)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]  # no cut in the duration range: said with the numbers, not as "no batch"
    assert "no cut is trained on, of the 36 cuts: 36 shorter than data.min_duration=19 s" in last


def test_missing_audio_stops_at_start_naming_the_file(tiny_corpus, tmp_path):
    import shutil

    from cuts.prepare import prepare_audio_dir

    src = tmp_path / "gone"
    shutil.copytree(tiny_corpus["root"] / "raw" / "speech" / "train", src)
    prepare_audio_dir(src, tmp_path / "set", min_duration=0.5)
    shutil.rmtree(src)
    r = run_cli(tiny_overrides(tiny_corpus, tmp_path / "exp", **{"data.train_cuts": tmp_path / "set" / "cuts.jsonl.gz"}),
                tmp_path)
    assert r.returncode != 0
    assert "does not load" in r.stderr and str(src) in r.stderr
    assert not (tmp_path / "exp" / "checkpoints").exists()


def test_failing_audio_during_training_stops_nonzero_naming_files(tiny_corpus, tmp_path):
    """Audio that loads at start-up but fails later: the run stops at the next logging step, exit 1, no NaN."""
    env = {**__import__("os").environ, "NEST_TEST_FAIL_RANK": "0"}
    r = subprocess.run([sys.executable, "-m", "tests.support.trace_train", str(tmp_path / "t.jsonl"), "-1",
                        *tiny_overrides(tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 20, "data.num_workers": 0,
                                                                          "trainer.log_every_n_steps": 3})],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode != 0
    assert "failed to load" in r.stderr and "injected failure of" in r.stderr and "max_failed_fraction" in r.stderr
    steps = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["cut_ids"] == [] for s in steps)  # the 3rd, a logging step, stopped the run


def test_bins_of_another_corpus_warn_with_numbers(tiny_corpus, tmp_path, caplog):
    from cuts.bins import Bins
    from cuts.feed import DataFeed

    Bins(upper=[1.0, 2.0], num_cuts=10, max_duration=2.0).save(tmp_path / "short_bins.yaml")
    cfg = tiny(tiny_corpus, tmp_path / "exp", **{"data.bins": tmp_path / "short_bins.yaml"})
    DataFeed(cfg.data, 16000, 0).preflight()
    warning = " ".join(r.getMessage() for r in caplog.records if "another corpus" in r.getMessage())
    assert "longest duration 2.00 s" in warning and "nest-prepare bins" in warning


def test_new_run_into_used_exp_dir_is_refused(tiny_corpus, tmp_path):
    (tmp_path / "exp" / "checkpoints").mkdir(parents=True)
    (tmp_path / "exp" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"already holds a run.*resume=auto"):
        train(tiny(tiny_corpus, tmp_path / "exp"))


@pytest.mark.skipif(not (NEMO_FIXTURES / "nest_tiny.nemo").is_file(), reason="no NeMo fixture")
def test_init_from_mismatch_names_settings_and_patterns_must_match(tiny_corpus, tmp_path):
    from nest.training.step import StepOptions
    from nest.training.module import make_module
    from nest.training.run import initialize

    nemo = str(NEMO_FIXTURES / "nest_tiny.nemo")
    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path / "e", init_from=nemo, init_include="[encoder.*]",
                                           **{"model.encoder.n_layers": 2, "model.encoder.d_model": 64,
                                              "model.encoder.n_heads": 4, "model.encoder.xscaling": "false"}))
    module = make_module(cfg.model, cfg.optim, StepOptions(), 0)
    with pytest.raises(ConfigError) as e:
        initialize(module, cfg)
    msg = str(e.value)
    assert "model.encoder.subsampling_conv_channels: checkpoint 32, this run 256" in msg
    assert "model.encoder.xscaling: checkpoint True, this run False" in msg and "init_model_config=true" in msg

    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path / "e", init_from=nemo, init_model_config="true",
                                           init_include="[decoder.nothing*]"))
    assert cfg.model.encoder.d_model == 64 and cfg.model.quantizer.num_books == 2  # taken from the .nemo
    with pytest.raises(ConfigError, match=r"init_include pattern 'decoder.nothing\*' matches no tensor"):
        initialize(make_module(cfg.model, cfg.optim, StepOptions(), 0), cfg)
    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path / "e", init_from=nemo, init_model_config="true",
                                           init_include="[decoder.*]"))
    with pytest.raises(ConfigError, match="loads no encoder tensor"):
        initialize(make_module(cfg.model, cfg.optim, StepOptions(), 0), cfg)
    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path / "e", init_from=nemo, init_model_config="true",
                                           init_include="[encoder.*]", **{"model.quantizer.num_classes": 32}))
    initialize(make_module(cfg.model, cfg.optim, StepOptions(), 0), cfg)  # another decoder, same encoder: fine


def test_cuts_no_batch_ever_takes_are_counted_at_start_up(tiny_corpus, tmp_path, caplog):
    from cuts.feed import DataFeed

    # 36 cuts of 1-4 s in 3 buckets: one batch of 40 s takes most of a bucket, and drop_last drops the rest
    big = tiny(tiny_corpus, tmp_path / "exp", **{"data.batch_duration": 40})
    DataFeed(big.data, 16000, 0).preflight()
    warning = " ".join(r.getMessage() for r in caplog.records if "no batch of an epoch" in r.getMessage())
    assert "never trained on" in warning and "data.batch_duration=40" in warning
    caplog.clear()
    small = tiny(tiny_corpus, tmp_path / "exp2", **{"data.batch_duration": 5})
    DataFeed(small.data, 16000, 0).preflight()
    assert not [r for r in caplog.records if "no batch of an epoch" in r.getMessage()]
