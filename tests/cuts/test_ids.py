"""A corpus laid out the common way (speaker folders with the same file names, a same-stem pair) keeps
every good file, through a folder and through a NeMo manifest, and its ids with "/" work downstream."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from cuts.prepare import file_id, prepare_audio_dir, whole_names
from cuts.sampler import open_cuts
from cuts.sources import export_shar, prepare_nemo_manifests

RNG = np.random.default_rng(1)


def speaker_tree(root: Path) -> dict[str, float]:
    """spk1..spk3 each with 001.wav..003.wav, and x.wav beside x.flac and x.ogg: relative path -> duration."""
    files = {f"spk{s}/{i:03d}.wav": 1.0 + 0.1 * (3 * s + i) for s in (1, 2, 3) for i in (1, 2, 3)}
    files |= {"spk2/x.wav": 1.3, "spk2/x.flac": 1.4, "spk2/x.ogg": 1.6}
    for name, seconds in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.1 * RNG.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
    (root / "spk1" / "notes.txt").write_text("not audio")
    return files


EXPECTED_IDS = {f"spk{s}/{i:03d}" for s in (1, 2, 3) for i in (1, 2, 3)} | {"spk2/x.wav", "spk2/x.flac", "spk2/x.ogg"}


def loaded_durations(cuts_path: Path) -> dict[str, float]:
    return {c.id: c.load_audio().shape[-1] / c.sampling_rate for c in CutSet.from_file(cuts_path)}


def folder_ids(names):
    whole = whole_names(names)
    return {n: file_id(n, whole) for n in names}


def test_file_ids_unique_by_construction():
    assert folder_ids(["001.wav", "002.flac"]) == {"001.wav": "001", "002.flac": "002"}
    assert folder_ids(["x.wav", "x.flac"]) == {"x.wav": "x.wav", "x.flac": "x.flac"}
    # x.wav keeps its extension (x.flac), so x.wav.flac, whose stem is "x.wav", must keep its own
    ids = folder_ids(["x.wav", "x.flac", "x.wav.flac"])
    assert len(set(ids.values())) == 3 and ids["x.wav.flac"] == "x.wav.flac"


def test_speaker_tree_through_audio_dir_keeps_every_file_and_loads_from_elsewhere(tmp_path, monkeypatch):
    files = speaker_tree(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    summary = prepare_audio_dir(Path("corpus"), Path("out"), jobs=2)  # relative paths, as a user types them
    assert summary["num_cuts"] == len(files) and summary["num_rejected"] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the manifest's audio paths are absolute: it works from any folder
    durations = loaded_durations(tmp_path / "out" / "cuts.jsonl.gz")
    assert set(durations) == EXPECTED_IDS
    for name, seconds in files.items():
        cut_id = name if name.startswith("spk2/x") else name.removesuffix(".wav")
        assert durations[cut_id] == pytest.approx(seconds, abs=1e-3)
    cut = next(iter(CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")))
    assert cut.recording.id == cut.id and os.path.isabs(cut.recording.sources[0].source)


def test_speaker_tree_through_nemo_manifest_same_ids(tmp_path, monkeypatch):
    files = speaker_tree(tmp_path / "corpus")
    lines = [{"audio_filepath": name, "duration": seconds} for name, seconds in files.items()]
    lines.append({"audio_filepath": str(tmp_path / "corpus" / "spk1" / "001.wav"), "duration": files["spk1/001.wav"]})
    (tmp_path / "corpus" / "train.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    monkeypatch.chdir(tmp_path)
    summary = prepare_nemo_manifests([Path("corpus/train.json")], Path("out"))
    assert summary["num_cuts"] == len(files)
    assert summary["rejected_by_reason"] == {"duplicate": 1}  # only the same file listed twice
    monkeypatch.chdir(tmp_path / "corpus")
    assert set(loaded_durations(tmp_path / "out" / "cuts.jsonl.gz")) == EXPECTED_IDS  # ids as audio-dir gives them


def test_nemo_audio_outside_the_manifest_folder(tmp_path):
    speaker_tree(tmp_path / "audio")
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "a.json").write_text(json.dumps({"audio_filepath": "../audio/spk1/001.wav"}) + "\n")
    (tmp_path / "manifests" / "b.json").write_text(json.dumps({"audio_filepath": str(tmp_path / "audio/spk2/001.wav")}))
    prepare_nemo_manifests([tmp_path / "manifests" / "a.json", tmp_path / "manifests" / "b.json"], tmp_path / "out")
    ids = {c.id for c in CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")}
    assert ids == {"audio/spk1/001", "audio/spk2/001"}  # relative to the folder holding manifests and audio


def test_ids_with_slashes_through_shar(tmp_path):
    speaker_tree(tmp_path / "corpus")
    prepare_audio_dir(tmp_path / "corpus", tmp_path / "out")
    result = export_shar(tmp_path / "out" / "cuts.jsonl.gz", tmp_path / "shar", shard_size=5, seed=3)
    assert result["num_cuts"] == len(EXPECTED_IDS) and result["num_failed"] == 0
    shar = list(open_cuts(str(tmp_path / "shar"), seed=0))
    assert {c.id for c in shar} == EXPECTED_IDS
    assert all(c.load_audio().shape[-1] > 0 for c in shar)
    again = export_shar(tmp_path / "out" / "cuts.jsonl.gz", tmp_path / "shar", shard_size=5, seed=3)  # replaces it
    assert again["num_shards"] == result["num_shards"] == 3


@pytest.mark.parametrize("fmt", ["npy", "lhotse"])
def test_ids_with_slashes_through_extract(tmp_path, fmt):
    from nest.io import save_model
    from nest.config import load_config
    from nest.extract import extract
    from nest.objectives import NestModel
    from tests.conftest import ROOT

    speaker_tree(tmp_path / "corpus")
    prepare_audio_dir(tmp_path / "corpus", tmp_path / "out")
    save_model(NestModel(load_config(ROOT / "configs" / "nest_tiny.yaml").model), tmp_path / "model.pt")
    cuts = CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")
    assert extract(str(tmp_path / "model.pt"), cuts, tmp_path / "feats", layers="-1", fmt=fmt, device="cpu") == 12
    if fmt == "npy":
        found = {str(p.relative_to(tmp_path / "feats" / "layer1").with_suffix("")) for p in
                 (tmp_path / "feats" / "layer1").rglob("*.npy")}
        assert found == EXPECTED_IDS
    else:
        with_feats = CutSet.from_file(tmp_path / "feats" / "cuts_with_features.jsonl.gz")
        assert {c.id for c in with_feats} == EXPECTED_IDS
        assert all(c.load_custom("layer_1").shape[1] == 64 for c in with_feats)
