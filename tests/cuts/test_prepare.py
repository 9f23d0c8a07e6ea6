"""Prepare stage: every good file becomes a cut of the right duration, every bad one is reported."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from cuts.prepare import NothingUsable, prepare_audio_dir
from cuts.sampler import open_cuts
from cuts.sources import export_shar, prepare_lhotse_manifest, prepare_nemo_manifests, prepare_recipe

RNG = np.random.default_rng(0)


def tone(seconds, sr, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.01 * RNG.standard_normal(len(t))
    return np.stack([x] * channels, 1).astype(np.float32) if channels > 1 else x.astype(np.float32)


def make_tree(root: Path) -> tuple[dict, set]:
    """Good files (name -> true duration) and bad files under ``root``."""
    good = {
        "a/wav16k.wav": (1.3, 16000, 1, "WAV"),
        "a/flac44k.flac": (2.1, 44100, 1, "FLAC"),
        "b/stereo8k.wav": (1.7, 8000, 2, "WAV"),
        "b/four_channels.flac": (1.2, 16000, 4, "FLAC"),
        "b/c/vorbis.ogg": (1.5, 22050, 1, "OGG"),
    }
    for name, (dur, sr, ch, fmt) in good.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone(dur, sr, ch), sr, format=fmt)
    bad = {"bad/zero_bytes.wav", "bad/truncated.wav", "bad/random_bytes.flac", "bad/silence.wav", "bad/tiny.wav"}
    (root / "bad").mkdir()
    (root / "bad/zero_bytes.wav").write_bytes(b"")
    sf.write(root / "bad/full.wav", tone(2.0, 16000), 16000)
    data = (root / "bad/full.wav").read_bytes()
    (root / "bad/full.wav").unlink()
    (root / "bad/truncated.wav").write_bytes(data[: len(data) // 2])
    (root / "bad/random_bytes.flac").write_bytes(RNG.bytes(4000))
    sf.write(root / "bad/silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(root / "bad/tiny.wav", tone(0.05, 16000), 16000)
    return {k: v[0] for k, v in good.items()}, bad


def rejected(out: Path) -> dict:
    return {Path(r["path"]).name: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}


def file_id(name: str) -> str:
    """The id prepare gives a file: its path relative to the source folder, without the extension."""
    return str(Path(name).with_suffix(""))


@pytest.mark.parametrize("jobs", [1, 2])
def test_audio_dir_mixed_formats_rates_channels_and_bad_files(tmp_path, jobs):
    good, bad = make_tree(tmp_path / "src")
    summary = prepare_audio_dir(tmp_path / "src", tmp_path / "out", min_duration=0.1, channel="mix", jobs=jobs)
    cuts = {c.id: c for c in CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")}
    for name, duration in good.items():
        cut = cuts[file_id(name)]
        assert abs(cut.duration - duration) <= 0.01, name
        assert abs(cut.load_audio().shape[-1] / cut.sampling_rate - duration) <= 0.01
    assert cuts["b/stereo8k"].sampling_rate == 8000 and cuts["a/flac44k"].sampling_rate == 44100  # source rates kept
    assert cuts["b/four_channels"].num_channels == 4  # --channel mix keeps all channels, averaged on load
    reasons = rejected(tmp_path / "out")
    assert set(reasons) == {Path(b).name for b in bad}
    assert reasons["zero_bytes.wav"] == "empty"
    assert reasons["truncated.wav"].startswith("corrupt: truncated wav")
    assert reasons["random_bytes.flac"].startswith("unreadable")
    assert reasons["silence.wav"] == "zero energy"
    assert reasons["tiny.wav"].startswith("too short")
    assert summary["num_cuts"] == len(good) and summary["num_rejected"] == len(bad)
    assert summary["rejected_by_reason"] == {"empty": 1, "corrupt": 1, "unreadable": 1, "zero energy": 1, "too short": 1}
    lines = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert all(x["reason"].startswith(x["kind"]) for x in lines)  # kind for counting, reason in full
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["hours"] == pytest.approx(sum(good.values()) / 3600, abs=1e-4)


def test_channel_first_and_windows_same_name_in_two_folders(tmp_path):
    (tmp_path / "src" / "x").mkdir(parents=True)
    sf.write(tmp_path / "src" / "long.wav", tone(25.0, 16000, 2), 16000)
    sf.write(tmp_path / "src" / "x" / "long.wav", tone(3.0, 16000), 16000)  # same name, another folder: kept
    summary = prepare_audio_dir(tmp_path / "src", tmp_path / "out", channel="first", window=10.0)
    cuts = {c.id: c for c in CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")}
    assert {k: round(c.duration, 3) for k, c in cuts.items()} == {"long-0": 10.0, "long-1": 10.0, "long-2": 5.0,
                                                                   "x/long": 3.0}
    assert all(c.num_channels == 1 for c in cuts.values())
    assert summary["num_rejected"] == 0


def test_nothing_usable_fails_with_reasons(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.wav").write_bytes(b"")
    with pytest.raises(NothingUsable, match="no usable audio.*empty"):
        prepare_audio_dir(tmp_path / "src", tmp_path / "out")


def test_nemo_manifest(tmp_path):
    audio = tmp_path / "data" / "audio"
    audio.mkdir(parents=True)
    sf.write(audio / "u1.flac", tone(4.0, 16000), 16000)
    sf.write(audio / "u2.wav", tone(2.0, 8000), 8000)
    lines = [
        {"audio_filepath": "audio/u1.flac", "duration": 1.5, "offset": 0.5, "text": "first half"},
        {"audio_filepath": "audio/u1.flac", "duration": 2.0, "offset": 2.0, "text": "second"},
        {"audio_filepath": str(audio / "u2.wav"), "duration": 2.0},
        {"audio_filepath": "audio/missing.wav", "duration": 3.0},
        {"audio_filepath": "audio/u2.wav", "duration": 5.0, "offset": 1.0},
        {"audio_filepath": "audio/u2.wav", "duration": 2.0},  # the same file, listed again
        {"audio_filepath": "audio/u1.flac", "duration": "long"},
    ]
    manifest = tmp_path / "data" / "train.json"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    summary = prepare_nemo_manifests([manifest], tmp_path / "out")
    cuts = sorted(CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz"), key=lambda c: (c.recording_id, c.start))
    assert [(c.id, round(c.start, 3), round(c.duration, 3)) for c in cuts] == [
        ("audio/u1-00000500-00001500", 0.5, 1.5), ("audio/u1-00002000-00002000", 2.0, 2.0), ("audio/u2", 0.0, 2.0)]
    assert cuts[0].supervisions[0].text == "first half"
    assert len(cuts[0].load_audio()[0]) == 24000
    reasons = list(map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()))
    by_kind = {r["kind"]: r for r in reasons}
    assert summary["num_rejected"] == len(reasons) == 5
    assert summary["rejected_by_reason"] == {"missing": 1, "segment past the end": 1, "bad manifest line": 2,
                                             "duplicate": 1}
    assert "missing.wav" in by_kind["missing"]["path"] and by_kind["missing"]["where"] == f"{manifest}:4"
    assert by_kind["duplicate"]["path"] == str(audio / "u2.wav") and "'audio/u2'" in by_kind["duplicate"]["reason"]
    assert {r["where"] for r in reasons if r["kind"] == "bad manifest line"} == {f"{manifest}:7", f"{manifest}:8"}


def test_lhotse_manifest_and_shar_roundtrip(tmp_path):
    good, _ = make_tree(tmp_path / "src")
    prepare_audio_dir(tmp_path / "src", tmp_path / "a")
    summary = prepare_lhotse_manifest([tmp_path / "a" / "cuts.jsonl.gz"], tmp_path / "b")
    assert summary["num_cuts"] == len(good)
    export_shar(tmp_path / "b" / "cuts.jsonl.gz", tmp_path / "shar", shard_size=2)
    shar = list(open_cuts(str(tmp_path / "shar"), seed=0))
    assert sorted(c.id for c in shar) == sorted(file_id(g) for g in good)  # ids with "/" survive Shar
    for cut in shar:
        assert abs(cut.load_audio().shape[-1] / cut.sampling_rate - good[next(g for g in good if file_id(g) == cut.id)]) < 0.01


def test_librispeech_and_musan_layouts_through_recipe(tmp_path):
    ls = tmp_path / "LibriSpeech"
    for part, spk in (("dev-clean", "84"), ("train-clean-5", "19")):
        chapter = ls / part / spk / "121"
        chapter.mkdir(parents=True)
        ids = [f"{spk}-121-{i:04d}" for i in range(3)]
        for i, uid in enumerate(ids):
            sf.write(chapter / f"{uid}.flac", tone(1.0 + i, 16000), 16000)
        (chapter / f"{spk}-121.trans.txt").write_text("\n".join(f"{u} HELLO WORLD {i}" for i, u in enumerate(ids)) + "\n")
    sf.write(ls / "dev-clean" / "84" / "121" / "84-121-0001.flac", np.zeros(16000, dtype=np.float32), 16000)  # silent
    summary = prepare_recipe("librispeech", ls, tmp_path / "ls_out")
    assert summary["num_cuts"] == 5 and summary["rejected_by_reason"] == {"zero energy": 1}
    cuts = list(CutSet.from_file(tmp_path / "ls_out" / "cuts.jsonl.gz"))
    assert all(c.supervisions[0].text.startswith("HELLO WORLD") for c in cuts)

    musan = tmp_path / "musan"
    for part in ("noise", "music", "speech"):
        (musan / part / "sub").mkdir(parents=True)
        for i in range(2):
            sf.write(musan / part / "sub" / f"{part}-{i}.wav", tone(12.0, 16000), 16000)
    (musan / "music" / "sub" / "ANNOTATIONS").write_text("music-0 jazz N artist\nmusic-1 rock Y band\n")
    summary = prepare_recipe("musan", musan, tmp_path / "musan_out", window=10.0)
    assert summary["num_cuts"] == 12  # 6 files, each a 10 s window and a 2 s tail


def test_real_audio_every_file_usable_with_true_duration(tmp_path, real_data):
    summary = prepare_audio_dir(real_data / "speech", tmp_path / "out", jobs=2)
    cuts = {c.id: c for c in CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")}
    files = sorted((real_data / "speech").iterdir())
    assert summary["num_rejected"] == 0 and len(cuts) == len(files)
    for f in files:
        true = sf.info(f).duration
        assert abs(cuts[f.stem].duration - true) <= 0.01, f.name
    noise = prepare_audio_dir(real_data / "noise", tmp_path / "noise", window=10.0)
    assert noise["num_rejected"] == 0 and noise["num_cuts"] >= 5


def test_nothing_usable_leaves_the_previous_set_in_place(tmp_path):
    # e.g. an unmounted network folder: empty where the corpus used to be
    (tmp_path / "src").mkdir()
    sf.write(tmp_path / "src" / "a.wav", (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
    prepare_audio_dir(tmp_path / "src", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "empty").mkdir()
    with pytest.raises(NothingUsable, match="left as it was"):
        prepare_audio_dir(tmp_path / "empty", tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_linked_folders_are_followed_once_and_what_is_skipped_is_counted(tmp_path):
    outside = tmp_path / "elsewhere" / "more"
    for path in (tmp_path / "src" / "a" / "1.wav", outside / "2.flac", outside / "deeper" / "3.wav"):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone(1.0, 16000), 16000)
    (tmp_path / "src" / "a" / "notes.txt").write_text("not audio")
    (tmp_path / "src" / "linked").symlink_to(outside)  # a corpus assembled from links: every file is read
    (tmp_path / "src" / "a" / "loop").symlink_to(tmp_path / "src")  # a loop: read once, no endless walk
    (tmp_path / "src" / "again").symlink_to(tmp_path / "src" / "a")  # the same folder twice: read once
    (tmp_path / "src" / "file_link.wav").symlink_to(outside / "2.flac")
    (tmp_path / "src" / "broken.wav").symlink_to(tmp_path / "nowhere.wav")
    summary = prepare_audio_dir(tmp_path / "src", tmp_path / "out")
    ids = sorted(c.id for c in CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz"))
    assert ids == ["a/1", "file_link", "linked/2", "linked/deeper/3"]
    assert summary["rejected_by_reason"] == {"missing": 1}
    assert summary["skipped"] == {"folders reached again through a link": 2, "files not audio (by extension)": 1}


def test_an_empty_input_folder_creates_no_output_folder(tmp_path, capsys):
    from cuts.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["audio-dir", str(tmp_path / "empty"), str(tmp_path / "new" / "out")]) == 1
    assert not (tmp_path / "new").exists()
    assert "holds no audio file" in capsys.readouterr().err


def test_lhotse_manifest_relative_paths_and_missing_files(tmp_path, monkeypatch):
    from lhotse import Recording, RecordingSet
    from lhotse.audio import AudioSource

    data = tmp_path / "corpus"
    (data / "audio").mkdir(parents=True)
    sf.write(data / "audio" / "u1.wav", tone(1.0, 16000), 16000)
    sf.write(tmp_path / "u2.wav", tone(1.0, 16000), 16000)

    def rec(rid, path):
        return Recording(id=rid, sources=[AudioSource("file", [0], str(path))], sampling_rate=16000,
                         num_samples=16000, duration=1.0)

    RecordingSet.from_recordings([
        rec("beside_manifest", "audio/u1.wav"),  # relative to the manifest's folder
        rec("from_working_folder", "u2.wav"),  # relative to the working folder, as lhotse reads it
        rec("nowhere", "audio/gone.wav"),
        rec("absolute_gone", tmp_path / "gone.wav"),
    ]).to_file(data / "recordings.jsonl.gz")
    monkeypatch.chdir(tmp_path)
    summary = prepare_lhotse_manifest([Path("corpus/recordings.jsonl.gz")], tmp_path / "out")
    cuts = {c.id: c for c in CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")}
    assert cuts["beside_manifest"].recording.sources[0].source == str(data / "audio" / "u1.wav")
    assert cuts["from_working_folder"].recording.sources[0].source == str(tmp_path / "u2.wav")
    assert summary["rejected_by_reason"] == {"missing": 2}
    reasons = {r["where"].rsplit(":", 1)[1]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert "'audio/gone.wav' found neither from the working folder" in reasons["3"]
    assert reasons["4"] == "missing: no such file"


def test_shar_export_says_how_many_streams_it_feeds_and_has_one_writer(tmp_path, caplog):
    from cuts.lock import FolderBusy, replace_lock

    good, _ = make_tree(tmp_path / "src")
    prepare_audio_dir(tmp_path / "src", tmp_path / "set")
    cuts = tmp_path / "set" / "cuts.jsonl.gz"
    (tmp_path / ".shar.tmp").mkdir()  # left by an interrupted export of an earlier version
    with caplog.at_level("INFO"):
        one = export_shar(cuts, tmp_path / "shar")
    assert one["num_shards"] == one["max_streams"] == 1 and one["num_cuts"] == len(good)
    assert "feed at most 1 training stream(s)" in caplog.text and f"its {len(good)} cuts feed at most" in caplog.text
    assert export_shar(cuts, tmp_path / "shar", shard_size=2)["max_streams"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".shar.lock"]
    with replace_lock(tmp_path / "shar"):  # another export of the same folder is running
        with pytest.raises(FolderBusy, match=r"shar is being written by pid \d+"):
            export_shar(cuts, tmp_path / "shar")
    before = sorted(p.name for p in (tmp_path / "shar").iterdir())
    for source in (tmp_path / "src").rglob("*.*"):
        source.unlink()  # the audio is gone: nothing can be exported
    with pytest.raises(NothingUsable, match="no cut of .* could be exported.*left as it was"):
        export_shar(cuts, tmp_path / "shar")
    assert sorted(p.name for p in (tmp_path / "shar").iterdir()) == before


def test_many_short_files_rejected_are_said_with_the_fix(tmp_path, caplog):
    (tmp_path / "src").mkdir()
    for i in range(6):  # four 0.5 s files, two of 2 s
        sf.write(tmp_path / "src" / f"{i}.wav", tone(0.5 if i < 4 else 2.0, 8000), 8000)
    summary = prepare_audio_dir(tmp_path / "src", tmp_path / "out", min_duration=1.0)
    assert summary["num_cuts"] == 2 and summary["rejected_by_reason"] == {"too short": 4}
    assert "4 of 6 inputs rejected, 4 of them too short" in caplog.text and "lower --min-duration" in caplog.text
