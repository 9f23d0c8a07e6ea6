"""k-means targets: MFCC as fairseq's HuBERT, label layout on the model's tokens, fit, relabel, encoder sources."""
import gzip
import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from lhotse import CutSet

from cuts.dataset import at_rate, load_mono
from cuts.prepare import prepare_audio_dir
from cuts.targets import TargetsSpec, collate_targets, load_targets, targets_spec
from nest.config import load_config
from nest.errors import FeatureError
from nest.io import load_model, save_model
from nest.kmeans import assign, fit_kmeans, KMeansOptions, main, run_kmeans
from nest.kmeans.features import Featurizer, mfcc, mfcc_recipe, num_tokens
from nest.objectives import NestModel
from tests.conftest import NEMO_FIXTURES, ROOT

SMALL = KMeansOptions(n_init=2, batch_size=512, max_iter=20, max_no_improvement=10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the encoder runs per cut, and extra threads only contend on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fairseq_mfcc(wav: torch.Tensor, sr: int) -> torch.Tensor:
    """The reference: fairseq's dump_mfcc_feature.py MfccFeatureReader.get_feats, written out here
    (in the dtype of ``wav``: float32 as fairseq, float64 for the exact value)."""
    x = wav.view(1, -1)
    mfccs = torchaudio.compliance.kaldi.mfcc(waveform=x, sample_frequency=sr, use_energy=False).transpose(0, 1)
    deltas = torchaudio.functional.compute_deltas(mfccs)
    ddeltas = torchaudio.functional.compute_deltas(deltas)
    return torch.cat([mfccs, deltas, ddeltas], dim=0).transpose(0, 1).contiguous()


@pytest.fixture(scope="module")
def real_cuts(tmp_path_factory):
    from tests.conftest import REAL_DATA

    if not (REAL_DATA / "speech").is_dir():
        pytest.skip(f"real audio not found at {REAL_DATA}")
    out = tmp_path_factory.mktemp("real_set")
    prepare_audio_dir(REAL_DATA / "speech", out)
    return out / "cuts.jsonl.gz"


@pytest.fixture(scope="module")
def few_cuts(real_cuts, tmp_path_factory):
    """Six of the real cuts, the 22.05 kHz one among them: for the slower encoder-feature tests."""
    cuts = CutSet.from_file(real_cuts).to_eager()
    keep = [c for c in cuts if c.sampling_rate != 16000] + [c for c in cuts if c.duration < 3][:5]
    path = tmp_path_factory.mktemp("few") / "cuts.jsonl.gz"
    CutSet.from_cuts(keep).to_file(path)
    return path


def test_mfcc_equals_fairseq_reference_on_real_audio(real_cuts):
    """Audio read as fairseq reads it (soundfile, float in [-1, 1], resampled to 16 kHz), MFCC as it computes them."""
    featurizer = Featurizer(mfcc_recipe())
    rates = set()
    for cut in CutSet.from_file(real_cuts):
        rates.add(cut.sampling_rate)
        wav = torch.from_numpy(sf.read(cut.recording.sources[0].source, dtype="float32", always_2d=True)[0].mean(1))
        audio = featurizer.load_audio(cut)
        if cut.sampling_rate != 16000:
            wav = torchaudio.functional.resample(wav, cut.sampling_rate, 16000)
            # Lhotse resamples with torchaudio's sinc kernel too; it keeps round(duration * 16000) samples.
            assert abs(len(wav) - len(audio)) <= 1
            wav = wav[: len(audio)]
            torch.testing.assert_close(torch.from_numpy(audio), wav, atol=1e-5, rtol=0, msg=cut.id)
            wav = torch.from_numpy(audio)  # MFCC amplify resampler rounding in near-silent frames: compare on one input
        else:
            assert torch.equal(torch.from_numpy(audio), wav), cut.id
        ours = torch.from_numpy(featurizer(audio)).double()
        ref = fairseq_mfcc(wav, 16000).double()
        assert ours.shape == ref.shape == (1 + (len(wav) - 400) // 160, 39), cut.id
        # Equal within float32 rounding: no further from the float64 computation than torchaudio's own
        # float32 result is (features reach about 75; the largest differences sit in near-silent frames).
        exact = fairseq_mfcc(wav.double(), 16000)
        ours_err, ref_err = (ours - exact).abs(), (ref - exact).abs()
        assert ours_err.max() <= 4 * ref_err.max() and ours_err.mean() <= 1.5 * ref_err.mean(), cut.id
        torch.testing.assert_close(ours, ref, atol=5e-3, rtol=0, msg=cut.id)
    assert 22050 in rates  # the LJSpeech file went through resampling


def test_mfcc_labels_sit_on_the_nearest_mel_frame():
    """A 5 ms burst: the Kaldi frame with the most energy lands on the mel frame with the most energy."""
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    recipe = mfcc_recipe(cfg)
    featurizer, mel = Featurizer(recipe), NestModel(cfg).preprocessor
    rng = np.random.default_rng(0)
    for j0, delta in [(40, 0), (57, 40), (90, 60)]:
        audio = 1e-4 * rng.standard_normal(16000).astype(np.float32)
        centre = 160 * j0 + delta
        audio[centre - 40: centre + 40] += 0.5 * np.hanning(80).astype(np.float32)
        kaldi_peak = int(featurizer(audio)[:, 0].argmax())  # c0 ~ log energy
        feats, _ = mel(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
        mel_peak = int(feats[0].sum(0).argmax())
        layout = featurizer.to_tokens(np.arange(kaldi_peak + 10), len(audio)).reshape(-1)
        assert mel_peak == j0 and layout[mel_peak] == kaldi_peak


def test_mfcc_layout_edges():
    rng = np.random.default_rng(0)
    for n in (399, 400, 401, 560, 1234):  # around one window, one shift
        x = torch.from_numpy(rng.uniform(-0.5, 0.5, n).astype(np.float32))
        ours = mfcc(x, 16000)
        assert ours.shape == (0 if n < 400 else 1 + (n - 400) // 160, 39)
        if n >= 400:
            torch.testing.assert_close(ours, fairseq_mfcc(x, 16000), atol=1e-3, rtol=1e-4)
    recipe = mfcc_recipe()
    n = 16000 + 1234  # not a whole number of tokens
    n_kaldi = 1 + (n - 400) // 160
    layout = Featurizer(recipe).to_tokens(np.arange(n_kaldi), n)
    n_mel = n // 160
    assert layout.shape == (-(-n_mel // 8), 8)
    flat = layout.reshape(-1)
    assert flat[0] == -1  # mel frame 0 has no Kaldi frame centred near it
    assert (flat[1: n_kaldi + 1] == np.arange(n_kaldi)).all()
    assert (flat[n_kaldi + 1:] == -1).all()  # past Kaldi's last frame and past the end


def test_labels_have_one_row_per_token_the_model_makes(real_cuts, tmp_path):
    run_kmeans(real_cuts, tmp_path, clusters=8, sample_fraction=0.5, seed=1, options=SMALL)
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml").model
    model = NestModel(cfg).eval()
    labelled = CutSet.from_file(tmp_path / "cuts.jsonl.gz")
    assert len(labelled) == len(CutSet.from_file(real_cuts))
    for cut in labelled:
        audio = torch.from_numpy(load_mono(at_rate(cut, 16000)))[None]
        _, enc_lens = model.encode(audio, torch.tensor([audio.shape[1]]))
        targets = load_targets(at_rate(cut, 16000))
        assert targets.shape == (int(enc_lens[0]), 8), cut.id
        assert targets.shape[0] == num_tokens(audio.shape[1], 0.01, 16000, 8)
        assert targets.dtype == np.int64 and targets.min() >= -1 and targets.max() < 8
        assert (targets[1:-1] >= 0).all()  # only the first and the last token have unlabelled positions
        assert targets_spec(cut) == TargetsSpec(num_classes=8, labels_per_token=8, token_shift=0.08)


def test_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (12, 39)).astype(np.float32)
    truth = rng.integers(0, 12, 6000)
    x = centres[truth] + rng.normal(0, 0.5, (6000, 39)).astype(np.float32)
    found, _ = fit_kmeans(x, 12, seed=0, options=SMALL)
    dist = np.linalg.norm(found[:, None] - centres[None], axis=-1)  # (found, planted)
    assert sorted(dist.argmin(0)) == list(range(12))  # every planted centre has its own centroid
    assert dist.min(0).max() < 0.2
    labels, _ = assign(torch.from_numpy(x), torch.from_numpy(found))
    mapping = dist.argmin(0)  # planted -> found
    assert (labels.numpy() == mapping[truth]).all()


def test_fairseq_defaults_and_clear_errors(tmp_path, real_cuts):
    assert KMeansOptions() == KMeansOptions(max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100,
                                            n_init=20, reassignment_ratio=0.0)
    with pytest.raises(FeatureError, match="--clusters 50 needs at least 50"):
        fit_kmeans(np.zeros((10, 3), np.float32), 50, seed=0)
    empty = tmp_path / "empty.jsonl.gz"
    CutSet([]).to_file(empty)
    with pytest.raises(FeatureError, match=f"CUTS {empty} holds no cuts"):
        run_kmeans(empty, tmp_path / "o")
    with pytest.raises(FeatureError, match="--checkpoint .*missing.ckpt: no such file"):
        run_kmeans(real_cuts, tmp_path / "o", features="encoder", checkpoint=str(tmp_path / "missing.ckpt"), layer=0)
    nemo = NEMO_FIXTURES / "nest_tiny.nemo"
    if nemo.is_file():
        with pytest.raises(FeatureError, match=r"--layer 6 is out of range for the 2-layer encoder .* use 0\.\.1"):
            run_kmeans(real_cuts, tmp_path / "o", features="encoder", checkpoint=str(nemo), layer=6)
    assert main([str(tmp_path / "nope.jsonl.gz"), str(tmp_path / "o")]) == 1


def test_model_relabels_with_the_same_result_in_parallel(real_cuts, tmp_path):
    first = run_kmeans(real_cuts, tmp_path / "fit", clusters=6, sample_fraction=0.5, seed=3, options=SMALL)
    saved = torch.load(tmp_path / "fit" / "kmeans.pt", weights_only=True)
    assert saved["centroids"].shape == (6, 39) and saved["recipe"]["kind"] == "mfcc"
    assert saved["recipe"]["labels_per_token"] == 8 and saved["recipe"]["sample_rate"] == 16000
    again = run_kmeans(real_cuts, tmp_path / "relabel", model_path=str(tmp_path / "fit" / "kmeans.pt"), jobs=2)
    a = {c.id: load_targets(c) for c in CutSet.from_file(tmp_path / "fit" / "cuts.jsonl.gz")}
    b = {c.id: load_targets(c) for c in CutSet.from_file(tmp_path / "relabel" / "cuts.jsonl.gz")}
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert again["usage_perplexity"] == pytest.approx(first["usage_perplexity"])
    summary = json.loads((tmp_path / "relabel" / "summary.json").read_text())
    assert summary["num_cuts"] == len(a) and summary["clusters_used"] <= 6 and summary["hours"] > 0
    with pytest.raises(FeatureError, match="--clusters 7 but --model .* has 6"):
        run_kmeans(real_cuts, tmp_path / "x", clusters=7, model_path=str(tmp_path / "fit" / "kmeans.pt"))
    with pytest.raises(FeatureError, match="--features encoder but --model .* was fit on mfcc"):
        run_kmeans(real_cuts, tmp_path / "x", features="encoder", model_path=str(tmp_path / "fit" / "kmeans.pt"))


@pytest.mark.parametrize("source", ["nemo", "ours"])
def test_encoder_layer_of_a_checkpoint_as_feature_source(few_cuts, tmp_path, source):
    if source == "nemo":
        ckpt = NEMO_FIXTURES / "nest_tiny.nemo"
        if not ckpt.is_file():
            pytest.skip(f"{ckpt} not found")
    else:
        torch.manual_seed(0)
        ckpt = tmp_path / "model.pt"
        save_model(NestModel(load_config(ROOT / "configs" / "nest_tiny.yaml").model), ckpt)
    summary = run_kmeans(few_cuts, tmp_path / "out", features="encoder", checkpoint=str(ckpt), layer=0,
                         clusters=5, sample_fraction=1.0, options=SMALL)
    assert summary["features"] == "encoder" and summary["layer"] == 0 and summary["labels_per_token"] == 1
    assert summary["fit"]["steps"] > 0
    model = load_model(ckpt)
    centroids = torch.load(tmp_path / "out" / "kmeans.pt", weights_only=True)["centroids"]
    for cut in CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz"):
        audio = torch.from_numpy(load_mono(at_rate(cut, 16000)))[None]
        _, enc_lens, hidden = model.encode(audio, torch.tensor([audio.shape[1]]), return_layers=True)
        expected, _ = assign(hidden[0][0, :, : int(enc_lens[0])].T, centroids)
        assert (load_targets(cut)[:, 0] == expected.numpy()).all(), cut.id


def test_corrupt_audio_is_rejected_and_listed(tmp_path, real_data):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("spk1_snt1.wav", "spk1_snt2.wav"):
        (src / name).write_bytes((real_data / "speech" / name).read_bytes())
    prepare_audio_dir(src, tmp_path / "set")
    (src / "spk1_snt2.wav").write_bytes(b"RIFF garbage, not audio any more")  # broken after prepare
    # Through the command line, with fairseq's k-means parameters.
    assert main([str(tmp_path / "set" / "cuts.jsonl.gz"), str(tmp_path / "out"), "--clusters", "4",
                 "--sample-fraction", "1"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_cuts"] == 1 and summary["num_rejected"] == 1 and summary["fit"]["options"]["n_init"] == 20
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["path"].endswith("spk1_snt2.wav") and rejected[0]["reason"].startswith("unreadable")
    assert [c.id for c in CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")] == ["spk1_snt1"]


def test_targets_through_mixed_cuts_and_collation(real_cuts, tmp_path):
    run_kmeans(real_cuts, tmp_path, clusters=4, sample_fraction=0.5, options=SMALL)
    cuts = CutSet.from_file(tmp_path / "cuts.jsonl.gz").to_eager()
    a, b = cuts[0], cuts[1]
    mixed = a.mix(b.truncate(duration=min(1.0, b.duration)), offset_other_by=0.2, snr=10, preserve_id="left")
    assert (load_targets(mixed) == load_targets(a)).all()  # the first track's cut carries the labels
    batch = collate_targets([load_targets(a), load_targets(b)])
    ta, tb = load_targets(a), load_targets(b)
    assert batch.shape == (2, max(len(ta), len(tb)), 8) and batch.dtype == torch.int64
    short, n = (1, len(tb)) if len(tb) < len(ta) else (0, len(ta))
    assert (batch[short, n:] == -1).all()
    unlabelled = CutSet.from_file(real_cuts)[0]
    with pytest.raises(KeyError, match=f"cut '{unlabelled.id}' has no 'targets'"):
        load_targets(unlabelled)
    with pytest.raises(KeyError, match=f"cut '{unlabelled.id}' has no 'targets'"):
        targets_spec(unlabelled)
    assert targets_spec(mixed) == targets_spec(a)


def small_corpus(root, n: int, seconds: float = 2.0):
    from cuts.synth import utterance

    rng = np.random.default_rng(n)
    (root / "src").mkdir()
    for i in range(n):
        sf.write(root / "src" / f"{i:02d}.wav", utterance(rng, 16000, seconds), 16000)
    prepare_audio_dir(root / "src", root / "set")
    return root / "set" / "cuts.jsonl.gz"


def test_a_small_corpus_widens_the_fit_sample_and_says_so(tmp_path, caplog):
    cuts = small_corpus(tmp_path, 14)  # a hashed 10% of 14 cuts is one or none
    with caplog.at_level("WARNING"):
        summary = run_kmeans(cuts, tmp_path / "out", clusters=20, seed=3, options=SMALL)
    fit = summary["fit"]
    assert fit["sample_fraction"] == 0.1 and fit["sample_frames"] >= 20 * 40 and 0.1 < fit["sample_fraction_used"] <= 1
    assert fit["sample_cuts"] < 14 and "the fit sample of --sample-fraction 0.1" in caplog.text
    again = run_kmeans(cuts, tmp_path / "again", clusters=20, seed=3, jobs=2, options=SMALL)
    assert again["fit"]["sample_cuts"] == fit["sample_cuts"]  # the same cuts for any --jobs: seeded hashes
    with pytest.raises(FeatureError, match=r"has \d+ frames in the fit sample \(all its cuts\), fewer than --clusters "
                                           r"100000: use --clusters \d+ or fewer"):
        run_kmeans(cuts, tmp_path / "x", clusters=100000, options=SMALL)
    assert not (tmp_path / "x").exists()  # a failed first run leaves no folder


def test_bad_manifest_lines_are_listed_not_lost(tmp_path):
    cuts = small_corpus(tmp_path, 3)
    lines = gzip.decompress(cuts.read_bytes()).decode().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0], "not json", '{"id": "x", "type": "MonoCut", "duration": null}', *lines[1:]]))
    assert main([str(broken), str(tmp_path / "out"), "--clusters", "2", "--sample-fraction", "1"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_cuts"] == 3 and summary["rejected_by_reason"] == {"bad manifest line": 2}
    where = [json.loads(x)["where"] for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert where == [f"{broken}:2", f"{broken}:3"]
