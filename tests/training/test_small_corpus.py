"""Small corpora and long recordings at start-up: a tiny corpus trains and is called tiny, an epoch that drop_last
would leave empty is not, and what the duration limits leave out is counted with the fix (--window)."""
import gzip
import json
import logging
import re
import subprocess
import sys
from itertools import islice

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from cuts.feed import DataFeed, DataSetupError
from cuts.prepare import prepare_audio_dir
from nest.config import load_config
from nest.errors import ConfigError
from nest.training.preflight import preflight
from tests.conftest import ROOT


def corpus(folder, durations, seed=0):
    """Noise-like 'speech' files of the given durations, prepared: the path of their cuts.jsonl.gz."""
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True)
    for i, d in enumerate(durations):
        sf.write(folder / "audio" / f"{i:03d}.wav", (0.1 * rng.standard_normal(int(d * 16000))).astype(np.float32), 16000)
    prepare_audio_dir(folder / "audio", folder / "set")
    return folder / "set" / "cuts.jsonl.gz"


def data_cfg(cuts, tmp_path, **kv):
    """The default configuration (no bins, 30 buckets, 600 s batches, drop_last) but for the given keys."""
    return load_config(None, [f"data.train_cuts={cuts}", f"exp_dir={tmp_path / 'exp'}", "trainer.accelerator=cpu",
                              *(f"{k}={v}" for k, v in kv.items())])


def epoch_batches(feed):
    sampler = feed.train_dataloader().sampler
    return [item.cuts for item in islice(iter(sampler), 3)]


def test_fewer_cuts_than_buckets_and_an_empty_epoch_still_train(tmp_path, caplog):
    cuts = corpus(tmp_path, [2.0, 3.0, 2.5, 4.0, 1.5])  # 13 s: no bucket ever fills a batch of 600 s
    cfg = data_cfg(cuts, tmp_path)
    feed = DataFeed(cfg.data, 16000, 0)
    feed.preflight()
    warnings = " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "data.drop_last=true would leave every epoch empty" in warnings and "a tiny corpus: 5 cuts" in warnings
    assert feed.meaning()["drop_last"] is False and cfg.data.drop_last is True  # the user's config is not rewritten
    batches = epoch_batches(feed)
    assert len(batches) == 3 and all(len(b) == 5 for b in batches)  # one batch of all cuts, each epoch


def test_cuts_over_max_duration_are_counted_with_the_fix(tmp_path, caplog):
    cuts = corpus(tmp_path, [2.0, 3.0, 70.0, 2.5, 65.0])
    DataFeed(data_cfg(cuts, tmp_path).data, 16000, 0).preflight()
    line = next(r.getMessage() for r in caplog.records if "never trained on" in r.getMessage())
    assert "2 of the 5 cuts" in line and "2 longer than data.max_duration=60 s" in line and "--window 30" in line
    assert "up to 70 s" in line
    assert not [r for r in caplog.records if "share the last bucket" in r.getMessage()]


def test_a_set_of_long_recordings_only_stops_at_start_up(tmp_path):
    cuts = corpus(tmp_path, [70.0])
    with pytest.raises(ConfigError, match=r"no cut is trained on, of the 1 cuts: 1 longer than data.max_duration=60 s"
                                          r".*--window 30"):
        preflight(data_cfg(cuts, tmp_path))


def test_a_cut_longer_than_a_batch_is_left_out_not_batched_alone(tmp_path, caplog):
    cuts = corpus(tmp_path, [2.0, 3.0, 12.0, 2.5])
    feed = DataFeed(data_cfg(cuts, tmp_path, **{"data.batch_duration": 10, "data.max_duration": 100}).data, 16000, 0)
    feed.preflight()
    line = next(r.getMessage() for r in caplog.records if "never trained on" in r.getMessage())
    assert "1 longer than the 10 s one batch of data.batch_duration=10 s holds" in line
    assert "--window 10" in line and "or raise data.batch_duration" in line
    assert all(c.duration <= 10 for b in epoch_batches(feed) for c in b)
    with pytest.raises(DataSetupError, match="one batch of data.batch_duration=1 s holds"):
        DataFeed(data_cfg(cuts, tmp_path, **{"data.batch_duration": 1}).data, 16000, 0).preflight()


def test_a_tiny_corpus_trains_with_the_default_config_from_another_folder(tmp_path):
    cuts = corpus(tmp_path, [2.0, 3.0, 2.5])
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "nest_tiny.yaml", f"data.train_cuts={cuts}",
                        "data.batch_duration=600", "data.num_buckets=30", "data.max_duration=60", "trainer.max_steps=2",
                        "trainer.enable_progress_bar=false", "exp_dir=exp"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "a tiny corpus: 3 cuts" in r.stderr and "Traceback" not in r.stderr
    for noise in ("weights_only", "litlogger", "LeafSpec", "Mean of empty slice", "invalid value encountered"):
        assert noise not in r.stderr, noise
    assert r.stdout.strip().splitlines()[-1].startswith("trained 2 steps")


def _rewrite(path, lines):
    with gzip.open(path, "wt") as f:
        f.writelines(lines)


def test_a_manifest_prepared_again_at_the_same_path_does_not_resume_its_old_position(tmp_path, caplog):
    cuts = corpus(tmp_path, [2.0, 3.0, 2.5, 1.5, 2.2, 2.8])
    cfg = data_cfg(cuts, tmp_path)
    feed = DataFeed(cfg.data, 16000, 0)
    feed.epoch, feed.batches_done = 3, 7
    state = feed.state_dict()
    again = DataFeed(cfg.data, 16000, 0)
    again.load_state_dict(state)
    assert (again.epoch, again.batches_done) == (3, 7)  # same content: exact resume
    lines = gzip.open(cuts, "rt").readlines()
    _rewrite(cuts, lines[:4])  # prepared again: same path, other cuts
    other = DataFeed(cfg.data, 16000, 0)
    other.load_state_dict(state)
    assert (other.epoch, other.batches_done) == (4, 0)
    assert any("contents" in r.getMessage() and "does not carry over" in r.getMessage() for r in caplog.records)


def test_relative_audio_paths_are_refused_with_the_command(tmp_path, monkeypatch):
    cuts = corpus(tmp_path, [2.0, 3.0])
    lines = []
    for line in gzip.open(cuts, "rt"):
        d = json.loads(line)
        d["recording"]["sources"][0]["source"] = "audio/" + d["recording"]["sources"][0]["source"].rsplit("/", 1)[1]
        lines.append(json.dumps(d) + "\n")
    _rewrite(tmp_path / "rel.jsonl.gz", lines)
    monkeypatch.chdir(tmp_path)  # where the paths would even resolve: still refused, a worker's folder may differ
    with pytest.raises(ConfigError, match=r"rel.jsonl.gz names its audio by relative paths \(such as audio/0.*"
                                          r"nest-prepare manifest"):
        preflight(data_cfg(tmp_path / "rel.jsonl.gz", tmp_path))


def test_gzip_manifest_cut_short_stops_start_up_and_ends_an_epoch_mid_run(tmp_path, caplog):
    cuts = corpus(tmp_path, [2.0 + 0.1 * i for i in range(30)])
    data = cuts.read_bytes()
    short = tmp_path / "short.jsonl.gz"
    short.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ConfigError, match=r"data.train_cuts: .*short.jsonl.gz: unreadable after line \d+ .*cut short") \
            as start_up:
        preflight(data_cfg(short, tmp_path))
    from cuts.io import ManifestError, iter_jsonl

    with pytest.raises(ManifestError) as reading:
        list(iter_jsonl(short))
    line = re.search(r"after line (\d+) ", str(reading.value)).group(1)  # the same line, whoever reads the file
    assert int(line) > 0 and f"after line {line} " in str(start_up.value)
    # The same damage met during training (the file replaced after start-up): the cuts before it are used.
    from cuts.sampler import open_cuts

    read = list(open_cuts(str(short), 0))
    assert 0 < len(read) < 30
    assert any("short.jsonl.gz: unreadable after line" in r.getMessage() and "skipped this epoch" in r.getMessage()
               for r in caplog.records)
    assert len(CutSet(open_cuts(str(cuts), 0)).to_eager()) == 30


@pytest.fixture(scope="module")
def valid_lines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    return gzip.open(corpus(folder, [1.5 + 0.2 * i for i in range(6)]), "rt").read().splitlines()


def _mutate(line: str, key: str, value) -> str:
    d = json.loads(line)
    target = d["recording"] if key in ("sources", "sampling_rate", "num_samples") else d
    if value == "<delete>":
        target.pop(key, None)
    else:
        target[key] = value
    return json.dumps(d)


def test_broken_manifests_train_or_stop_with_one_line(tmp_path, valid_lines):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    odd = st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=5), st.integers(-5, 10**9),
                    st.just("<delete>"), st.just([{"type": "file", "channels": [0], "source": "/nowhere.wav"}]))
    mutated = st.builds(_mutate, st.sampled_from(valid_lines), st.sampled_from(
        ["duration", "id", "start", "type", "channel", "sources", "sampling_rate", "num_samples"]), odd)
    garbage = st.one_of(st.text(max_size=30), st.just("[1, 2]"), st.just('{"id": "x"}'), st.just("{"))
    lines = st.lists(st.one_of(st.sampled_from(valid_lines), mutated, garbage), min_size=0, max_size=8)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(lines=lines, gz=st.booleans(), cut=st.one_of(st.none(), st.floats(0.0, 1.0)))
    def run(lines, gz, cut):
        path = tmp_path / ("m.jsonl.gz" if gz else "m.jsonl")
        data = "".join(line + "\n" for line in lines).encode()
        data = gzip.compress(data) if gz else data
        path.write_bytes(data[: int(len(data) * cut)] if cut is not None else data)
        try:
            preflight(data_cfg(path, tmp_path, **{"data.min_duration": 0.5}))
        except ConfigError as e:
            assert "\n" not in str(e) and str(e)
        from cuts.sampler import open_cuts
        list(open_cuts(str(path), 0))  # what the sampler reads mid-run: bad lines and a cut-short tail are skipped

    run()


@pytest.fixture(scope="module")
def six_cuts(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("six"), [1.5 + 0.4 * i for i in range(6)])


NAN_EDGES = "bucket_upper_duration: [.nan]\nbatch_sizes: [2]\n"


@pytest.mark.parametrize("key", ["data.bins", "data.bucket_batch_size"])
def test_any_bins_file_given_to_train_works_or_is_one_line(tmp_path, six_cuts, key):
    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 100), st.text(max_size=3),
                       st.none())
    docs = st.one_of(
        st.fixed_dictionaries({"bucket_upper_duration": st.lists(number, max_size=4),
                               "batch_sizes": st.lists(number, max_size=4)}).map(yaml.safe_dump),
        st.fixed_dictionaries({"bucket_upper_duration": number}).map(yaml.safe_dump),
        st.text(max_size=40), st.just("bucket_upper_duration: [1, 2\n"), st.just("- 1\n- 2\n"),
        st.just(NAN_EDGES))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=docs)
    def run(text):
        path = tmp_path / "b.yaml"
        path.write_text(text)
        try:
            preflight(data_cfg(six_cuts, tmp_path, **{key: path, "data.batch_duration": 10}))
        except ConfigError as e:
            assert "\n" not in str(e) and str(e).startswith(key), str(e)
        else:
            assert text != NAN_EDGES

    run()


def test_malformed_bins_yaml_is_one_line_naming_file_and_line(tmp_path, six_cuts):
    (tmp_path / "bins.yaml").write_text("bucket_upper_duration: [1.5, 3\nnum_cuts: 6\n")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), f"data.train_cuts={six_cuts}", "data.bins=bins.yaml",
                        "exp_dir=exp"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: data.bins: bins file bins.yaml:2 is not valid YAML")


def test_a_plain_manifest_cut_short_stops_start_up(tmp_path, six_cuts):
    text = gzip.open(six_cuts, "rt").read()
    (tmp_path / "cut.jsonl").write_text(text[: len(text) - 40])
    with pytest.raises(ConfigError, match=r"cut.jsonl: its last line breaks off .* cut short"):
        preflight(data_cfg(tmp_path / "cut.jsonl", tmp_path))
    (tmp_path / "whole.jsonl").write_text(text.rstrip("\n"))  # a last line without its newline is whole
    preflight(data_cfg(tmp_path / "whole.jsonl", tmp_path))
