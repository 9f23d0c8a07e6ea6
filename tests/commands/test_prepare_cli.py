"""nest-prepare on any input: a result, or one line naming the input and the fix with exit 1, never a traceback and
never an exit 0 that lost data. bins and report follow a training config's data section."""
import atexit
import contextlib
import gzip
import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lhotse import CutSet, MonoCut, Recording

from nest.prepare_cli import main

AUDIO_DIR = Path(tempfile.mkdtemp(prefix="nest-prepare-cli-"))  # made at import: the strategies below name it
atexit.register(shutil.rmtree, AUDIO_DIR, True)


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def good_cut_lines(n: int = 4) -> list[dict]:
    lines = []
    for i in range(n):
        path = AUDIO_DIR / f"u{i}.wav"
        if not path.exists():
            t = np.arange(int((1.0 + 0.5 * i) * 16000)) / 16000
            sf.write(path, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
        rec = Recording.from_file(path, recording_id=f"u{i}")
        lines.append(MonoCut(id=f"u{i}", start=0.0, duration=rec.duration, channel=0, recording=rec).to_dict())
    return lines


ODD = st.sampled_from([None, -1, 0, "x", "", [], {}, 1e308, math.inf, -0.5, True, "../../etc/passwd"])
KEYS = ["id", "duration", "start", "channel", "recording", ("recording", "sources"), ("recording", "sampling_rate"),
        ("recording", "duration"), ("recording", "num_samples"), ("recording", "id"), "type", "supervisions"]


@st.composite
def broken_line(draw) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "json", "bytes", "good"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    if kind == "json":
        value = draw(st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=5),
                                  lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                                  max_leaves=6))
        return json.dumps(value).encode()
    line = draw(st.sampled_from(good_cut_lines()))
    line = json.loads(json.dumps(line))
    if kind == "mutated":
        key = draw(st.sampled_from(KEYS))
        target, name = (line["recording"], key[1]) if isinstance(key, tuple) else (line, key)
        if draw(st.booleans()):
            target.pop(name, None)
        else:
            target[name] = draw(ODD)
    return json.dumps(line, allow_nan=True).encode()


@st.composite
def broken_manifest(draw) -> bytes:
    data = b"\n".join(draw(st.lists(broken_line(), max_size=6))) + b"\n"
    if draw(st.booleans()):
        data = gzip.compress(data, mtime=0)
    if draw(st.booleans()) and len(data) > 2:
        data = data[: draw(st.integers(1, len(data) - 1))]  # cut short
    return data


def check_outcome(rc: int, out: str, err: str, folder: Path) -> None:
    assert "Traceback" not in err, err
    if rc != 0:
        assert rc == 1, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "\n" not in last and str(folder) in last, err
    else:
        json.loads(out)


@st.composite
def nemo_manifest(draw) -> bytes:
    """NeMo lines with odd paths, durations and offsets, and lines that are no NeMo entry at all."""
    paths = st.sampled_from([str(AUDIO_DIR / "u1.wav"), "u1.wav", str(AUDIO_DIR / "gone.wav"), "", None, 5, [],
                             str(AUDIO_DIR)])
    entry = st.fixed_dictionaries({"audio_filepath": paths}, optional={"duration": ODD | st.floats(0, 3),
                                                                      "offset": ODD | st.floats(0, 3), "text": ODD})
    lines = draw(st.lists(st.one_of(entry.map(lambda d: json.dumps(d).encode()), broken_line()), max_size=6))
    return b"\n".join(lines) + b"\n"


COMMANDS = {
    "bins": lambda m, o: ["bins", m, "--out", o / "bins.yaml", "--no-plot", "--batch-duration", "4"],
    "report": lambda m, o: ["report", m, "--bins", o.parent / "good_bins.yaml", "--png", o / "r.png"],
    "split": lambda m, o: ["split", m, o / "split"],
    "manifest": lambda m, o: ["manifest", m, o / "set"],
    "shar": lambda m, o: ["shar", m, o / "shar"],
    "kmeans": lambda m, o: ["kmeans", m, o / "km", "--clusters", "2", "--sample-fraction", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=broken_manifest(), gz=st.booleans())
def test_broken_manifests_end_in_a_result_or_one_line(command, data, gz):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "good_bins.yaml").write_text(yaml.safe_dump({"bucket_upper_duration": [1.5, 3.0]}))
        manifest = tmp / ("cuts.jsonl.gz" if gz else "cuts.jsonl")
        manifest.write_bytes(data)
        out_dir = tmp / "out"
        rc, out, err = run(*COMMANDS[command](manifest, out_dir))
        check_outcome(rc, out, err, tmp)
        if rc == 0 and command == "manifest":  # every line is a cut or a rejection: nothing lost in silence
            summary = json.loads(out)
            lines = [x for x in gzip.decompress(data).split(b"\n") if x.strip()] if data[:2] == b"\x1f\x8b" else \
                [x for x in data.split(b"\n") if x.strip()]
            assert summary["num_cuts"] + summary["num_rejected"] >= len(lines)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=nemo_manifest())
def test_broken_nemo_manifests_end_in_a_result_or_one_line(data):
    good_cut_lines()  # the audio files the lines name
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.json").write_bytes(data)
        rc, out, err = run("nemo-manifest", tmp / "train.json", tmp / "out")
        check_outcome(rc, out, err, tmp)
        if rc == 0:
            summary = json.loads(out)
            lines = [x for x in data.split(b"\n") if x.strip()]
            assert summary["num_cuts"] + summary["num_rejected"] >= len(lines)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(st.sampled_from(["a.wav", "b/c.flac", "d.mp3", "e.ogg", "f.sph", "g.txt"]),
                                st.one_of(st.binary(max_size=64), st.just(b"good"))), max_size=5))
def test_broken_audio_folders_end_in_a_result_or_one_line(files):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        for name, content in files:
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            if content == b"good" and name.endswith((".wav", ".flac")):
                (tmp / "src" / name).write_bytes((AUDIO_DIR / "u0.wav").read_bytes())
            else:
                (tmp / "src" / name).write_bytes(content)
        rc, out, err = run("audio-dir", tmp / "src", tmp / "out", "--jobs", "1")
        check_outcome(rc, out, err, tmp)
        audio = {n for n, _ in files if not n.endswith(".txt")}
        if rc == 0:
            summary = json.loads(out)
            assert summary["num_cuts"] + summary["num_rejected"] == len(audio)
        else:
            assert not (tmp / "out").exists()


def test_bins_follow_the_config_and_its_overrides(tmp_path, caplog):
    CutSet.from_dicts(good_cut_lines(4)).to_file(tmp_path / "cuts.jsonl.gz")
    rc, out, err = run("bins", tmp_path / "cuts.jsonl.gz", "data.batch_duration=3", "--config", "nest_tiny.yaml",
                       "--out", tmp_path / "bins.yaml")
    assert rc == 0, err
    result = json.loads(out)
    assert result["batch_duration"] == 3 and result["tiny"] and result["steps_per_epoch"] >= 1
    assert yaml.safe_load((tmp_path / "bins.yaml").read_text())["batch_duration"] == 3
    assert "the corpus is tiny for data.batch_duration=3 s" in caplog.text and (tmp_path / "bins.png").is_file()
    rc, out, err = run("report", tmp_path / "cuts.jsonl.gz", f"data.bins={tmp_path / 'bins.yaml'}", "--seed", "0",
                       "data.batch_duration=3", "data.min_duration=0.5")  # key=value anywhere, as nest-train takes them
    assert rc == 0, err
    assert json.loads(out)["steps_per_epoch"] == result["steps_per_epoch"]  # the same sampler, the same settings
    rc, _, err = run("bins", tmp_path / "cuts.jsonl.gz", "data.batch_duraton=3", "--out", tmp_path / "b.yaml")
    assert rc == 1 and "unknown config key 'data.batch_duraton'" in err and "Traceback" not in err
    (tmp_path / "bad.yaml").write_text("data:\n  batch_duration: [1\n")
    rc, _, err = run("bins", tmp_path / "cuts.jsonl.gz", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "b.yaml")
    assert rc == 1 and f"config file {tmp_path / 'bad.yaml'} is not valid YAML at line 3" in err and "Traceback" not in err


def test_report_names_a_malformed_bins_file(tmp_path):
    CutSet.from_dicts(good_cut_lines(2)).to_file(tmp_path / "cuts.jsonl.gz")
    (tmp_path / "bins.yaml").write_text("bucket_upper_duration: [1.0, 2.0\nnum_cuts: 3\n")
    rc, out, err = run("report", tmp_path / "cuts.jsonl.gz", "--bins", tmp_path / "bins.yaml")
    assert rc == 1 and err.strip().splitlines()[-1].startswith(f"error: bins file {tmp_path / 'bins.yaml'}:")
    assert "is not valid YAML" in err and "Traceback" not in err
    (tmp_path / "sizes.yaml").write_text("batch_sizes: [1, 2]\nbucket_upper_duration: {a: 1}\n")
    rc, _, err = run("report", tmp_path / "cuts.jsonl.gz", "--batch-sizes", tmp_path / "sizes.yaml")
    assert rc == 1 and str(tmp_path / "sizes.yaml") in err and "Traceback" not in err
