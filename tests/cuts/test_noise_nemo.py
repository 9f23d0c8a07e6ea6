"""NeMo's augmentation: SNR over the whole utterance, num_speakers, segments; the batch loader."""
import random

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import Recording
from lhotse.cut import MixedCut

from cuts.config import NoiseConfig
from cuts.dataset import load_mono
from cuts.noise import NoiseMixer, load_batch_audio
from cuts.prepare import recording_to_cut

SR = 16000


def write_cuts(tmp_path, prefix, seconds, scale, seed):
    rng = np.random.default_rng(seed)
    cuts = []
    for i, d in enumerate(seconds):
        path = tmp_path / f"{prefix}{i}.flac"
        x = scale * rng.standard_normal(int(d * SR)) * np.sin(np.linspace(0, 20, int(d * SR))) ** 2
        sf.write(path, x.astype(np.float32), SR)
        cuts.append(recording_to_cut(Recording.from_file(path), "first"))
    return cuts


@pytest.fixture
def batch_and_noise(tmp_path, request):
    speech = write_cuts(tmp_path, "u", [3.0, 2.2, 4.1, 1.3, 2.7], 0.1, 0)
    noise = write_cuts(tmp_path, "n", [0.9, 6.0], 0.05, 1)
    try:
        real = request.getfixturevalue("real_data")
        noise += [recording_to_cut(Recording.from_file(p), "first") for p in sorted((real / "noise").glob("*.wav"))]
        speech += [recording_to_cut(Recording.from_file(p), "first")
                   for p in sorted((real / "speech").glob("spk*_snt[12].wav"))]
    except pytest.skip.Exception:
        pass
    return speech, noise


def nemo_noise(cut: MixedCut, clean: np.ndarray, snr: float) -> np.ndarray:
    """NeMo's MultiSpeakerNoiseAugmentation scaling, written out from its source: the unscaled segments
    placed in a zero signal, one scale from the mean energies over the utterance's length."""
    audio = torch.from_numpy(clean)
    noise_signal = torch.zeros_like(audio)
    for t in cut.tracks[1:]:
        start = round(t.offset * SR)
        piece = torch.from_numpy(load_mono(t.cut))[: len(audio) - start]
        noise_signal[start : start + len(piece)] += piece
    n = len(audio)
    audio_energy = torch.sum(audio**2) / n
    noise_energy = torch.sum(noise_signal**2) / n
    mix_scale = (audio_energy / (10 ** (snr / 10) * noise_energy)).sqrt() if noise_energy > 0 else 0
    return (mix_scale * noise_signal).numpy()


@pytest.mark.parametrize("noise_ratio", [1.0, 0.0])
def test_nemo_snr_definition_equals_nemos_formula(batch_and_noise, noise_ratio):
    speech, noise = batch_and_noise
    cfg = NoiseConfig(prob=1.0, noise_ratio=noise_ratio, mix_rate=[0.3, 0.7], num_segments=[1, 3], num_speakers=[1, 2])
    mixed = NoiseMixer(cfg, noise)(speech, random.Random(3))
    loaded = load_batch_audio(mixed, load_mono)
    for cut, (clean, added) in zip(mixed, loaded):
        snr = cut.tracks[1].snr
        expected = nemo_noise(cut, clean, snr)
        np.testing.assert_allclose(added, expected, rtol=1e-4, atol=1e-7)
        # Which is: clean energy over the noise energy across the whole utterance is the drawn SNR.
        measured = 10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum(added.astype(np.float64) ** 2))
        assert abs(measured - snr) < 1e-3


def test_segments_cover_nemos_mix_length_without_overlap(batch_and_noise):
    speech, noise = batch_and_noise
    cfg = NoiseConfig(prob=1.0, noise_ratio=0.5, mix_rate=[0.2, 0.8], num_segments=[1, 4])
    for seed in range(5):
        for cut in NoiseMixer(cfg, noise)(speech, random.Random(seed)):
            n = cut.tracks[0].cut.num_samples
            spans = sorted((round(t.offset * SR), round(t.offset * SR) + t.cut.num_samples) for t in cut.tracks[1:])
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # in order, no overlap
            assert spans[0][0] >= 0 and spans[-1][1] <= n
            total = sum(b - a for a, b in spans)
            assert int(n * 0.2) <= total <= int(n * 0.8) + 1


@pytest.mark.parametrize("speakers", [1, 3])
def test_num_speakers_other_utterances_in_speech_mode(batch_and_noise, speakers):
    speech, _ = batch_and_noise
    cfg = NoiseConfig(prob=1.0, noise_ratio=0.0, num_segments=[6, 6], num_speakers=[speakers, speakers])
    used = []
    for cut in NoiseMixer(cfg, None)(speech, random.Random(1)):
        ids = {t.cut.id for t in cut.tracks[1:]}
        assert cut.id not in ids and ids <= {c.id for c in speech}
        used.append(len(ids))
    # NeMo takes num_speakers distinct speakers in turn, then at random among them.
    assert max(used) == speakers and (speakers == 1 or min(used) >= 2)


def test_batch_loader_decodes_each_utterance_once(batch_and_noise):
    speech, noise = batch_and_noise
    reads = []

    def read(cut):
        reads.append(cut.id)
        return load_mono(cut)

    cfg = NoiseConfig(prob=1.0, noise_ratio=0.5, num_segments=[1, 3])
    mixed = NoiseMixer(cfg, noise)(speech, random.Random(0))
    loaded = load_batch_audio(mixed, read)
    speech_ids = {c.id for c in speech}
    assert sorted(i for i in reads if i in speech_ids) == sorted(speech_ids)  # once each, partners included
    noise_pieces = [t for c in mixed if isinstance(c, MixedCut) for t in c.tracks[1:] if t.cut.id not in speech_ids]
    assert len(reads) == len(speech) + len(noise_pieces)  # only the noise spans are read besides
    # A speech piece sliced from the batch equals reading that span of the file.
    for cut, (clean, added) in zip(mixed, loaded):
        for t in cut.tracks[1:]:
            if t.cut.id in speech_ids:
                start = round(t.offset * SR)
                piece = added[start : start + t.cut.num_samples]
                direct = load_mono(t.cut)[: len(piece)]
                ratio = np.dot(piece, direct) / max(np.dot(direct, direct), 1e-20)
                np.testing.assert_allclose(piece, ratio * direct, rtol=1e-4, atol=1e-7)


def test_a_failed_noise_piece_costs_only_that_piece(batch_and_noise):
    speech, noise = batch_and_noise
    bad_noise = noise[1].id
    bad_speech = speech[2].id

    def read(cut):
        if cut.id in (bad_noise, bad_speech):
            raise OSError(f"cannot read {cut.id}")
        return load_mono(cut)

    cfg = NoiseConfig(prob=1.0, noise_ratio=1.0)
    mixed = NoiseMixer(cfg, [noise[0], noise[1]])(speech, random.Random(2))
    loaded = load_batch_audio(mixed, read)
    assert isinstance(loaded[2], OSError)
    for cut, result in zip(mixed, loaded):
        if cut.id == bad_speech:
            continue
        clean, added = result
        sources = {t.cut.id for t in cut.tracks[1:]}
        assert np.isfinite(added).all() and len(clean) == len(added)
        if sources == {bad_noise}:
            assert not added.any()  # its only piece failed: no noise, utterance kept


def test_snr_definition_is_checked():
    with pytest.raises(ValueError, match="snr_definition"):
        NoiseMixer(NoiseConfig(snr_definition="peak"), None)
