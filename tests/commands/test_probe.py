"""The downstream probe: aggregation, training on a separable task, sources, labels, cache, CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording, SupervisionSegment

from nest.config import load_config
from nest.errors import ProbeError
from nest.io import load_model, save_model
from nest.objectives import NestModel
from nest.probe import features as probe_features, head, LayerWeightedSum, run as probe_run, run_probe
from nest.probe.features import FeatureSet, label_of, load_source, pool
from tests.conftest import NEMO_FIXTURES

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "nest_tiny.yaml")


def write_cuts(path: Path, items: list[tuple[Path, dict, dict]]) -> str:
    """A CutSet manifest: one cut per (audio file, supervision fields, cut custom fields)."""
    cuts = []
    for audio, sup_fields, custom in items:
        rec = Recording.from_file(audio)
        sup = SupervisionSegment(id=rec.id, recording_id=rec.id, start=0.0, duration=rec.duration, **sup_fields)
        cut = rec.to_cut().with_id(rec.id)
        cut.supervisions = [sup]
        cut.custom = custom or None
        cuts.append(cut)
    CutSet.from_cuts(cuts).to_file(path)
    return str(path)


def tone_task(root: Path, per_class: tuple[int, int] = (8, 4), seed: int = 0) -> tuple[str, str]:
    """Two classes anyone can tell apart: a low rising sweep and a high falling one, in a little noise.

    Sweeps, not steady tones: the encoder's front end normalises each mel band over the utterance,
    which leaves nothing of a steady tone but noise.
    """
    rng = np.random.default_rng(seed)
    sets = {"train": [], "dev": []}
    for split, n in zip(sets, per_class):
        for cls, (f0, f1) in (("low", (200.0, 900.0)), ("high", (4000.0, 1800.0))):
            for k in range(n):
                t = np.arange(int(rng.uniform(0.6, 1.2) * 16000)) / 16000
                freq = rng.uniform(0.9, 1.1) * (f0 + (f1 - f0) * t / t[-1])  # Hz at each sample
                x = 0.3 * np.sin(2 * np.pi * np.cumsum(freq) / 16000) + 0.01 * rng.standard_normal(len(t))
                path = root / split / f"{cls}{k}.flac"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, x.astype(np.float32), 16000)
                sets[split].append((path, {"text": cls, "speaker": f"{split}{k % 3}"}, {"tone": cls}))
    return write_cuts(root / "train.jsonl.gz", sets["train"]), write_cuts(root / "dev.jsonl.gz", sets["dev"])


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> tuple[str, str]:
    return tone_task(tmp_path_factory.mktemp("tones"))


def test_weighted_sum_is_softmax_weighted_and_starts_uniform():
    torch.manual_seed(0)
    agg = LayerWeightedSum(4)
    assert torch.allclose(agg.weights(), torch.full((4,), 0.25))  # NeMo's Aggregator starts at 1/L too
    x = torch.randn(3, 4, 5, 7)  # (B, L, D, T)
    assert torch.allclose(agg(x), x.mean(1), atol=1e-6)
    with torch.no_grad():
        agg.logits.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    e = torch.exp(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    manual = sum(float(e[i] / e.sum()) * x[:, i] for i in range(4))
    assert torch.allclose(agg(x), manual, atol=1e-6)
    assert torch.allclose(agg.weights().sum(), torch.tensor(1.0))


def test_pooling_each_layer_first_equals_pooling_the_weighted_sum():
    """Why the probe may pool once per layer and cut: mean and weighted sum commute (valid frames only)."""
    torch.manual_seed(1)
    agg = LayerWeightedSum(3)
    with torch.no_grad():
        agg.logits.normal_()
    frames = torch.randn(3, 11, 6)  # (L, T', D) of one cut
    with torch.no_grad():
        weighted_then_pooled = pool(agg(frames.permute(1, 0, 2)).numpy())  # (T', L, D) -> (T', D) -> (D,)
        pooled_then_weighted = agg(torch.from_numpy(np.stack([pool(f.numpy()) for f in frames]))[None])[0]
    assert np.allclose(weighted_then_pooled, pooled_then_weighted.numpy(), atol=1e-6)


def test_pooling_sees_valid_frames_only(tones):
    """A short cut batched with a long one (so padded) gives the frames it gives alone."""
    source = load_source(f"random:{TINY}", seed=0)
    cuts = sorted(CutSet.from_file(tones[0]), key=lambda c: c.duration)
    short, long = cuts[0], cuts[-1]
    assert long.duration - short.duration > 0.3
    alone = next(probe_features.iter_layer_frames(source, [short], [0, 1], 8, torch.device("cpu"), []))[1]
    batched = next(probe_features.iter_layer_frames(source, [short, long], [0, 1], 8, torch.device("cpu"), []))[1]
    for a, b in zip(alone, batched):
        assert a.shape == b.shape
        assert np.allclose(a, b, atol=1e-4)


def test_head_solves_a_separable_task_and_weights_the_layer_that_carries_it():
    """Pooled features where only layer 2 of 4 tells the classes apart: the head finds it."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> FeatureSet:
        y = torch.arange(n) % 3
        x = torch.randn(n, 4, 16, generator=g)
        x[:, 2, :3] += 6.0 * torch.nn.functional.one_hot(y, 3)  # class c lifts dimension c of layer 2
        return FeatureSet([str(i) for i in range(n)], [f"c{int(c)}" for c in y], x, [0, 1, 2, 3])

    r = head.train_probe(split(120), split(60), ["c0", "c1", "c2"], epochs=40, seed=0)
    assert r["accuracy"] >= 0.95 and r["train_accuracy"] >= 0.95, r
    assert max(range(4), key=lambda i: r["layer_weights"][i]) == 2, r["layer_weights"]
    confusion = torch.tensor(r["confusion"])  # rows: true class
    assert confusion.sum(1).tolist() == [20, 20, 20] and confusion.trace() / 60 == pytest.approx(r["accuracy"])


def test_probe_end_to_end_on_sweeps(tones):
    train, dev = tones
    r = run_probe("mel", train, dev, "text", epochs=30, seed=0)
    assert r["accuracy"] == 1.0 and r["loss"] < 0.1, r
    assert r["num_train"] == 16 and r["num_dev"] == 8 and r["num_classes"] == 2 and r["layer_weights"] == [1.0]
    r = run_probe(f"random:{TINY}", train, dev, "text", epochs=30, seed=0)
    assert r["accuracy"] >= 0.75 and r["train_accuracy"] == 1.0, r  # an untrained encoder: above chance
    assert r["layers"] == [0, 1] and abs(sum(r["layer_weights"]) - 1) < 1e-5


def test_probe_is_seeded(tones):
    train, dev = tones
    a, b = (run_probe(f"random:{TINY}", train, dev, "text", epochs=3, seed=5) for _ in range(2))
    c = run_probe(f"random:{TINY}", train, dev, "text", epochs=3, seed=6)
    assert a["loss"] == b["loss"] and a["layer_weights"] == b["layer_weights"]
    assert a["loss"] != c["loss"]


def test_random_init_is_the_config_seeded():
    cfg = load_config(TINY).model
    torch.manual_seed(3)
    expected = NestModel(cfg).state_dict()
    got = load_source(f"random:{TINY}", seed=3).model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    other = load_source(f"random:{TINY}", seed=4).model.state_dict()
    key = "encoder.layers.0.self_attn.linear_q.weight"
    assert not torch.equal(other[key], got[key])


def features(source, audio: torch.Tensor) -> torch.Tensor:
    hidden, _ = source(audio, torch.tensor([audio.shape[1]]))
    return torch.stack(hidden)


@pytest.mark.skipif(not (NEMO_FIXTURES / "nest_tiny.nemo").is_file(), reason="no NeMo fixture")
def test_nemo_and_our_checkpoints_load(tones, tmp_path):
    nemo = NEMO_FIXTURES / "nest_tiny.nemo"
    model = load_model(nemo)
    audio = torch.randn(1, 16000) * 0.1
    reference = torch.stack(model.encode(audio, torch.tensor([16000]), return_layers=True)[2])
    assert torch.equal(features(load_source(str(nemo), 0), audio), reference)
    # save_model's file
    save_model(model, tmp_path / "model.pt")
    assert torch.equal(features(load_source(str(tmp_path / "model.pt"), 0), audio), reference)
    # the layout of train.py's Lightning checkpoints
    from dataclasses import asdict

    torch.save({"hyper_parameters": {"model_config": asdict(model.cfg), "optim_config": {}},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "last.ckpt")
    assert torch.equal(features(load_source(str(tmp_path / "last.ckpt"), 0), audio), reference)
    train, dev = tones
    r = run_probe(str(nemo), train, dev, "text", epochs=2, layers="-1")
    assert r["layers"] == [model.cfg.encoder.n_layers - 1] and r["layer_weights"] == [1.0]


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(ProbeError, match="unknown kind 'wav2vec:'"):
        load_source("wav2vec:foo", 0)
    with pytest.raises(ProbeError, match="no such file"):
        load_source(str(tmp_path / "missing.ckpt"), 0)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ProbeError, match="notes.txt: not a readable PyTorch checkpoint: its 11 bytes are not in "
                                         "torch.save's format"):
        load_source(str(tmp_path / "notes.txt"), 0)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ProbeError, match="empty.ckpt: not a readable PyTorch checkpoint: the file is empty"):
        load_source(str(tmp_path / "empty.ckpt"), 0)
    with pytest.raises(ProbeError, match="does not exist"):
        load_source("random:configs/nope.yaml", 0)


def test_labels_from_supervisions_and_custom_fields(tones, tmp_path):
    train, dev = tones
    cut = next(iter(CutSet.from_file(train)))
    assert label_of(cut, "text") == "low" and label_of(cut, "speaker") == "train0"
    assert label_of(cut, "tone") == "low"  # a custom key of the cut
    cut.supervisions[0].custom = {"emotion": "calm"}
    assert label_of(cut, "emotion") == "calm"  # a custom key of the supervision
    assert label_of(cut, "language") is None
    by_custom = run_probe("mel", train, dev, "tone", epochs=20)
    by_text = run_probe("mel", train, dev, "text", epochs=20)
    assert by_custom["accuracy"] == by_text["accuracy"] and by_custom["classes"] == ["high", "low"]
    with pytest.raises(ProbeError, match=r"cut \S+ has no label 'language'.*it has: speaker, text, tone"):
        run_probe("mel", train, dev, "language")


def test_one_class_and_unseen_dev_labels_are_refused(tmp_path):
    root = tmp_path
    x = (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
    items = []
    for k in range(3):
        sf.write(root / f"a{k}.flac", x, 16000)
        items.append((root / f"a{k}.flac", {"speaker": "alice"}, {}))
    one = write_cuts(root / "one.jsonl.gz", items)
    with pytest.raises(ProbeError, match="every cut has speaker='alice'; a probe needs two classes"):
        run_probe("mel", one, one, "speaker")
    sf.write(root / "b.flac", x, 16000)
    two = write_cuts(root / "two.jsonl.gz", items + [(root / "b.flac", {"speaker": "bob"}, {})])
    dev = write_cuts(root / "dev.jsonl.gz", [(root / "b.flac", {"speaker": "carol"}, {})])
    with pytest.raises(ProbeError, match=r"labels absent from --train \(1\): \['carol'\]"):
        run_probe("mel", two, dev, "speaker")
    with pytest.raises(ProbeError, match="--train .*missing.jsonl.gz"):
        run_probe("mel", str(root / "missing.jsonl.gz"), dev, "speaker")


def test_cached_features_give_the_same_probe_without_the_encoder(tones, tmp_path, monkeypatch):
    train, dev = tones
    live = run_probe(f"random:{TINY}", train, dev, "text", epochs=10, seed=2)
    written = run_probe(f"random:{TINY}", train, dev, "text", epochs=10, seed=2, cache=tmp_path / "cache")
    assert written["cache"] == {"train": "written", "dev": "written"}
    # the cache is extract's Lhotse layout: cuts with one TemporalArray per layer
    cached = CutSet.from_jsonl_lazy(next((tmp_path / "cache").glob("train-*")) / "cuts_with_features.jsonl.gz")
    first = next(iter(cached))
    assert first.layer_1.load().shape[1] == 64 and first.supervisions[0].text in ("low", "high")

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although the features were cached")

    monkeypatch.setattr(probe_features, "load_source", no_encoder)
    read = run_probe(f"random:{TINY}", train, dev, "text", epochs=10, seed=2, cache=tmp_path / "cache")
    assert read["cache"] == {"train": "read", "dev": "read"}
    for key in ("accuracy", "loss", "train_loss", "layer_weights", "confusion"):
        assert live[key] == written[key] == read[key], key
    # another seed of the encoder is another model: not read from this cache
    with pytest.raises(AssertionError, match="the encoder ran"):
        run_probe(f"random:{TINY}", train, dev, "text", epochs=1, seed=3, cache=tmp_path / "cache")


def test_a_bad_audio_file_is_skipped_and_counted(tones, tmp_path):
    train, dev = tones
    cuts = list(CutSet.from_file(train))
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio at all")
    bad = Recording.from_file(cuts[0].recording.sources[0].source).to_cut().with_id("broken")
    bad.supervisions = cuts[0].supervisions
    bad.recording.sources[0].source = str(broken)
    CutSet.from_cuts(cuts + [bad]).to_file(tmp_path / "train.jsonl.gz")
    r = run_probe("mel", str(tmp_path / "train.jsonl.gz"), dev, "text", epochs=5)
    assert r["failed_cuts"] == {"train": 1, "dev": 0} and r["num_train"] == len(cuts)


def test_cli_prints_json_and_writes_the_picture(tones, tmp_path, capsys):
    train, dev = tones
    assert probe_run.main([f"random:{TINY}", "--train", train, "--dev", dev, "--label", "text", "--epochs", "5",
                       "--out", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"accuracy", "loss", "layer_weights", "num_train", "num_dev", "png"}
    png = Path(result["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["confusion"]
    assert probe_run.main(["mel", "--train", train, "--dev", dev, "--label", "accent"]) == 2
    assert "has no label 'accent'" in capsys.readouterr().err


def test_speaker_probe_on_real_recordings(real_data, tmp_path):
    """Two real speakers, four sentences each to train on and two held out, told apart by mean log-mel."""
    speech = real_data / "speech"
    items = {s: [(speech / f"{s}_snt{k}.wav", {"speaker": s}, {}) for k in range(1, 7)] for s in ("spk1", "spk2")}
    train = write_cuts(tmp_path / "train.jsonl.gz", items["spk1"][:4] + items["spk2"][:4])
    dev = write_cuts(tmp_path / "dev.jsonl.gz", items["spk1"][4:] + items["spk2"][4:])
    r = run_probe("mel", train, dev, "speaker", epochs=30)
    assert r["accuracy"] == 1.0 and r["num_dev"] == 4, r


def test_cache_takes_cut_ids_with_slashes(tones, tmp_path):
    train, dev = tones
    renamed = [c.with_id(f"voices/{c.id}") for c in CutSet.from_file(train)]
    CutSet.from_cuts(renamed).to_file(tmp_path / "train.jsonl.gz")
    a = run_probe("mel", str(tmp_path / "train.jsonl.gz"), dev, "text", epochs=5, cache=tmp_path / "cache")
    b = run_probe("mel", str(tmp_path / "train.jsonl.gz"), dev, "text", epochs=5, cache=tmp_path / "cache")
    assert b["cache"]["train"] == "read" and a["loss"] == b["loss"] and b["num_train"] == len(renamed)


def test_w2vbert_encoders_probe_too(tones, tmp_path):
    from nest.objectives.w2vbert import W2vBertModel

    train, dev = tones
    w2v = str(ROOT / "configs" / "w2vbert_tiny.yaml")
    r = run_probe(f"random:{w2v}", train, dev, "text", epochs=5, seed=0)
    assert r["layers"] == [0, 1] and 0.0 <= r["accuracy"] <= 1.0
    model = W2vBertModel(load_config(w2v).model)
    save_model(model, tmp_path / "w2v.pt")
    saved = run_probe(str(tmp_path / "w2v.pt"), train, dev, "text", epochs=5, seed=0, layers="-1")
    assert saved["layers"] == [1] and saved["num_dev"] == 8


def test_labels_from_the_folders_of_the_cut_id():
    from lhotse import MonoCut

    cut = MonoCut(id="sessionA/spk1/001", start=0, duration=1, channel=0)
    assert label_of(cut, "folder:-1") == "spk1" and label_of(cut, "folder:0") == "sessionA"
    assert label_of(cut, "folder:5") is None and label_of(MonoCut(id="001", start=0, duration=1, channel=0), "folder:-1") is None


def test_labels_from_a_regular_expression_over_the_cut_id(tones):
    from lhotse import MonoCut

    cut = MonoCut(id="7_george_12", start=0, duration=1, channel=0)
    assert label_of(cut, r"re:^(\d)_") == "7" and label_of(cut, "re:_([a-z]+)_") == "george"
    assert label_of(cut, r"re:\d+$") == "12"  # no group: the whole match
    assert label_of(cut, r"re:^x(\d)") is None
    train, dev = tones  # ids low0.., high0..: the class is the letters before the number
    by_id, by_text = run_probe("mel", train, dev, r"re:^([a-z]+)\d", epochs=20), run_probe("mel", train, dev, "text", epochs=20)
    assert by_id["classes"] == ["high", "low"] and by_id["accuracy"] == by_text["accuracy"]
    with pytest.raises(ProbeError, match=r"the id of cut \S+ does not match --label re:\^low"):
        run_probe("mel", train, dev, "re:^low")
    with pytest.raises(ProbeError, match=r"--label re:\(\\d: not a regular expression"):
        run_probe("mel", train, dev, r"re:(\d")
