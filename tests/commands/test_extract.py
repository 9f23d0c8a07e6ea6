"""Feature extraction and the pretrained encoder: every input kind, ids with folders, sample rates, eval mode."""
import numpy as np
import soundfile as sf
import torch
from lhotse import CutSet, MonoCut, Recording

from nest.config import load_config
from nest.extract import extract, load_pretrained_encoder
from nest.io import save_model
from nest.objectives import NestModel
from tests.conftest import ROOT


def corpus(tmp_path):
    """Cuts whose ids carry folders (spk1/001, spk2/001) and a same-stem pair (x.wav beside x.flac)."""
    rng = np.random.default_rng(0)
    cuts = []
    for i, name in enumerate(["spk1/001.wav", "spk2/001.wav", "spk2/x.wav", "spk2/x.flac"]):
        path = tmp_path / "audio" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(8000 + 1600 * i)).astype(np.float32), 16000)
        cut_id = name.rsplit(".", 1)[0] if "x." not in name else name
        rec = Recording.from_file(path, recording_id=cut_id)
        cuts.append(MonoCut(id=cut_id, start=0, duration=rec.duration, channel=0, recording=rec))
    CutSet(cuts).to_file(tmp_path / "cuts.jsonl.gz")
    return CutSet(cuts)


def test_every_input_kind_and_ids_with_folders(tmp_path):
    cuts = corpus(tmp_path)
    torch.manual_seed(0)
    save_model(NestModel(load_config(ROOT / "configs" / "nest_tiny.yaml").model), tmp_path / "m.pt")
    (tmp_path / "shar").mkdir()
    cuts.to_shar(tmp_path / "shar", fields={"recording": "flac"}, shard_size=2)
    for fmt in ("npy", "lhotse"):
        out = tmp_path / fmt
        from cuts.sampler import open_cuts

        n = extract(str(tmp_path / "m.pt"), open_cuts(str(tmp_path / "shar"), 0), out, layers="all", fmt=fmt)
        assert n == 4
        if fmt == "npy":
            names = sorted(str(p.relative_to(out / "layer1")) for p in (out / "layer1").rglob("*.npy"))
            assert names == ["spk1/001.npy", "spk2/001.npy", "spk2/x.flac.npy", "spk2/x.wav.npy"]
        else:
            got = {c.id: c.load_custom("layer_1") for c in CutSet.from_file(out / "cuts_with_features.jsonl.gz")}
            assert sorted(got) == sorted(c.id for c in cuts)
            assert all(a.shape[1] == 64 for a in got.values())
            assert not np.allclose(got["spk2/x.wav"][:5], got["spk2/x.flac"][:5])  # not one file twice


def test_pretrained_encoder_is_in_eval_mode_and_resamples(tmp_path):
    torch.manual_seed(0)
    save_model(NestModel(load_config(ROOT / "configs" / "nest_tiny.yaml").model), tmp_path / "m.pt")
    encoder = load_pretrained_encoder(tmp_path / "m.pt")
    assert not encoder.training and load_pretrained_encoder(tmp_path / "m.pt", train=True).training
    audio16 = torch.sin(torch.arange(16000) / 16000 * 2 * np.pi * 440)[None] * 0.1
    import torchaudio

    audio8 = torchaudio.functional.resample(audio16, 16000, 8000)
    a, la = encoder(audio16, torch.tensor([16000]))
    b, lb = encoder(audio8, torch.tensor([8000]), sample_rate=8000)
    assert torch.equal(la, lb) and a.shape == b.shape
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9
