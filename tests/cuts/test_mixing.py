"""The batch reader (soundfile straight into the batch, 16-bit PCM as int16) and mixing in the worker, on the
device and from a noise bank: the same samples and the same mixing law for the same seeds."""
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording

from cuts.audio import PCM16_SCALE, Direct, lhotse_mono, load_mono, read_rows
from cuts.config import NoiseConfig
from cuts.dataset import NestDataset, SamplerItem, at_rate
from cuts.mixing import BANK, PACKED, ROW, NoiseBank
from cuts.noise import NoiseMixer
from cuts.prepare import recording_to_cut
from cuts.shar import list_shards, shard_cuts, ShardProblems
from cuts.sources import export_shar

SR = 16000


def run(fn, cut):
    return fn()


@pytest.fixture
def odd_cuts(tmp_path, request):
    """Cuts that soundfile reads straight and cuts that lhotse must read, 16-bit and not."""
    rng = np.random.default_rng(0)
    x = (0.2 * rng.standard_normal((3 * SR, 2))).astype(np.float32)
    sf.write(tmp_path / "a.flac", x[:, 0], SR, subtype="PCM_16")
    sf.write(tmp_path / "b.wav", x[:, 0], SR, subtype="PCM_16")
    sf.write(tmp_path / "c24.flac", x[:, 0], SR, subtype="PCM_24")
    sf.write(tmp_path / "d.wav", x, SR, subtype="PCM_16")  # stereo
    sf.write(tmp_path / "e.wav", x[:, 0], 22050, subtype="PCM_16")  # resampled on load
    a, b, c24 = (recording_to_cut(Recording.from_file(tmp_path / n), "first") for n in ("a.flac", "b.wav", "c24.flac"))
    stereo = Recording.from_file(tmp_path / "d.wav")
    cuts = {"flac": a, "wav": b, "flac24": c24, "flac_span": a.truncate(offset=0.7311, duration=1.5),
            "stereo_ch1": stereo.to_cut().with_channels(1), "stereo_mean": recording_to_cut(stereo, "mix"),
            "resampled": at_rate(recording_to_cut(Recording.from_file(tmp_path / "e.wav"), "first"), SR)}
    try:
        real = request.getfixturevalue("real_data")
        cuts["real_sph"] = recording_to_cut(Recording.from_file(real / "speech" / "example3.sph"), "first")
    except pytest.skip.Exception:
        pass
    CutSet.from_cuts([a, b]).to_file(tmp_path / "ab.jsonl.gz")
    for fmt in ("flac", "wav"):
        export_shar(tmp_path / "ab.jsonl.gz", tmp_path / f"shar_{fmt}", shard_size=2, audio_format=fmt)
        for i, cut in enumerate(shard_cuts(list_shards(str(tmp_path / f"shar_{fmt}"))[0], True, ShardProblems())):
            cuts[f"shar_{fmt}_{i}"] = cut
    return cuts


def test_straight_reads_equal_lhotse_and_pcm16_is_exact(odd_cuts):
    for name, cut in odd_cuts.items():
        np.testing.assert_array_equal(load_mono(cut), lhotse_mono(cut), err_msg=name)
    straight = {n for n, c in odd_cuts.items() if Direct.of(c) is not None}
    assert {"flac", "wav", "flac24", "flac_span", "shar_flac_0", "shar_wav_1"} <= straight
    assert not straight & {"stereo_ch1", "stereo_mean", "resampled"}  # lhotse reads these
    pcm = [c for n, c in odd_cuts.items() if n in ("flac", "wav", "flac_span") or n.startswith("shar")]
    as_int, errors = read_rows(pcm, run, pcm16=True)
    as_float, _ = read_rows(pcm, run)
    assert as_int.dtype == torch.int16 and not any(errors)
    assert torch.equal(as_int * PCM16_SCALE, as_float)  # what soundfile returns as float32, bit for bit
    mixed, errors = read_rows([*pcm[:2], odd_cuts["flac24"], odd_cuts["resampled"]], run, pcm16=True)
    assert mixed.dtype == torch.float32 and not any(errors)  # a 24-bit or resampled cut: the batch turns float32
    assert torch.equal(mixed[:2], as_float[:2, : mixed.shape[1]])
    assert torch.equal(mixed[2, : odd_cuts["flac24"].num_samples], torch.from_numpy(lhotse_mono(odd_cuts["flac24"])))


def speech_and_noise(tmp_path, request):
    rng = np.random.default_rng(1)
    speech, noise = [], []
    for i, d in enumerate([3.0, 2.2, 4.1, 1.3, 2.7, 3.3]):
        sf.write(tmp_path / f"u{i}.flac", 0.1 * rng.standard_normal(int(d * SR)), SR, subtype="PCM_16")
        speech.append(recording_to_cut(Recording.from_file(tmp_path / f"u{i}.flac"), "first"))
    for i, d in enumerate([0.9, 6.0, 2.5]):
        sf.write(tmp_path / f"n{i}.wav", 0.05 * rng.standard_normal(int(d * SR)), SR, subtype="PCM_16")
        noise.append(recording_to_cut(Recording.from_file(tmp_path / f"n{i}.wav"), "first"))
    try:
        real = request.getfixturevalue("real_data")
        noise += [recording_to_cut(Recording.from_file(p), "first") for p in sorted((real / "noise").glob("*.wav"))]
        speech += [recording_to_cut(Recording.from_file(p), "first") for p in sorted((real / "speech").glob("spk1_*.wav"))]
    except pytest.skip.Exception:
        pass
    return speech, noise


@pytest.mark.parametrize("definition", ["nemo", "segment"])
@pytest.mark.parametrize("pcm16", [False, True])
def test_mixing_on_the_device_equals_mixing_in_the_worker(tmp_path, request, definition, pcm16):
    speech, noise = speech_and_noise(tmp_path, request)
    cfg = NoiseConfig(prob=0.9, noise_ratio=0.5, mix_rate=[0.2, 0.8], num_segments=[1, 3], num_speakers=[1, 2],
                      snr_definition=definition)
    worker = NestDataset(SR, NoiseMixer(cfg, noise), seed=4)
    device = NestDataset(SR, NoiseMixer(cfg, noise), seed=4, mix_on_device=True, pcm16=pcm16)
    bank = NoiseBank(noise)  # the whole noise set, in its order: the same draws as without a bank
    banked = NestDataset(SR, NoiseMixer(cfg, bank.cuts), seed=4, mix_on_device=True, bank=bank, pcm16=pcm16)
    samples = bank.load(load_mono)
    kinds = set()
    for index in range(6):
        item = SamplerItem(cuts=CutSet(speech), epoch=1, index=index)
        expected = worker[item]
        assert expected.noise is not None and expected.noise.abs().sum() > 0
        for ds, b in ((device, None), (banked, samples)):
            batch = ds[item]
            assert batch.noise is None and batch.mix is not None and batch.audio.dtype == (torch.int16 if pcm16 else torch.float32)
            kinds |= set(batch.mix.pieces[:, 3].tolist())
            got = batch.prepared(b)
            assert got.mix is None and batch.cut_ids == expected.cut_ids
            assert torch.equal(got.audio, expected.audio)
            torch.testing.assert_close(got.noise, expected.noise, rtol=1e-5, atol=1e-6)
    assert kinds == {ROW, PACKED, BANK}  # speech pieces, pieces decoded by the worker, pieces from the bank


def test_noise_bank_is_a_seeded_sample_and_its_pieces_are_the_noise(tmp_path, request):
    speech, noise = speech_and_noise(tmp_path, request)
    bank = NoiseBank.sample(noise, seconds=5.0, seed=7)
    assert [c.id for c in bank.cuts] == [c.id for c in NoiseBank.sample(noise, 5.0, 7).cuts]
    assert [c.id for c in bank.cuts] != [c.id for c in NoiseBank.sample(noise, 5.0, 8).cuts]
    assert bank.num_samples == pytest.approx(5.0 * SR, abs=1) and len({c.id for c in bank.cuts}) == len(bank.cuts)
    cfg = NoiseConfig(prob=1.0, noise_ratio=1.0, num_segments=[1, 3])
    # Mixing from the bank on the device equals mixing the bank's cuts (read from their files) in the worker.
    worker = NestDataset(SR, NoiseMixer(cfg, bank.cuts), seed=2)
    banked = NestDataset(SR, NoiseMixer(cfg, bank.cuts), seed=2, mix_on_device=True, bank=bank)
    samples = bank.load(load_mono)
    for index in range(4):
        item = SamplerItem(cuts=CutSet(speech), index=index)
        batch = banked[item]
        assert set(batch.mix.pieces[:, 3].tolist()) == {BANK} and batch.mix.packed is None  # nothing decoded
        torch.testing.assert_close(batch.prepared(samples).noise, worker[item].noise, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["flac", "wav"])
def test_an_unreadable_shard_member_costs_that_cut_and_is_counted(tmp_path, request, fmt):
    speech, _ = speech_and_noise(tmp_path, request)
    CutSet.from_cuts(speech).to_file(tmp_path / "c.jsonl.gz")
    export_shar(tmp_path / "c.jsonl.gz", tmp_path / "shar", shard_size=100, audio_format=fmt)
    tar = list_shards(str(tmp_path / "shar"))[0].recording
    with tarfile.open(tar) as t:  # the audio of the second member overwritten with garbage, the tar intact
        member = [m for m in t.getmembers() if m.name.endswith(f".{fmt}")][1]
    with open(tar, "r+b") as f:
        f.seek(member.offset_data)
        f.write(np.random.default_rng(0).bytes(member.size))
    cuts = list(shard_cuts(list_shards(str(tmp_path / "shar"))[0], True, ShardProblems()))
    assert len(cuts) == len(speech)
    batch = NestDataset(SR, None, seed=0, pcm16=True)[SamplerItem(cuts=CutSet(cuts))]
    assert batch.num_failed == 1 and len(batch.cut_ids) == len(speech) - 1
    assert batch.failed[0][0] == member.name.rsplit(".", 1)[0]


def test_workers_reuse_only_the_shared_buffers_handed_back(tmp_path, request):
    """Two workers write batches into recycled shared memory; a batch the training process still holds is
    never overwritten, and buffers come back only through give_back (what pin_memory does after its copy)."""
    from cuts.buffers import SharedBuffers, give_back

    speech, noise = speech_and_noise(tmp_path, request)
    items = [SamplerItem(cuts=CutSet(speech[i % 3 : i % 3 + 3]), index=i) for i in range(16)]
    cfg = NoiseConfig(prob=1.0)
    reference = NestDataset(SR, NoiseMixer(cfg, noise), seed=1, pcm16=True)
    buffers = SharedBuffers(num_workers=2, keep=4)
    ds = NestDataset(SR, NoiseMixer(cfg, noise), seed=1, pcm16=True, buffers=buffers)
    loader = torch.utils.data.DataLoader(ds, sampler=items, batch_size=None, num_workers=2, prefetch_factor=2)
    held, keys = [], []
    for i, batch in enumerate(loader):
        assert batch.audio.is_shared() and (not batch.buffers or batch.buffers[0] == buffers.token)
        expected = reference[items[i]]
        assert torch.equal(batch.audio, expected.audio)  # noise: equal up to the summation order of other threads
        torch.testing.assert_close(batch.noise, expected.noise, rtol=1e-5, atol=1e-7)
        keys += batch.buffers[2] if batch.buffers else []  # () when all its worker's buffers were out
        if i < 3:
            held.append((batch, expected))  # never handed back
        else:
            give_back(batch.buffers)
    for batch, expected in held:
        assert torch.equal(batch.audio, expected.audio)
        torch.testing.assert_close(batch.noise, expected.noise, rtol=1e-5, atol=1e-7)
    assert len(set(keys)) < len(keys)  # buffers were reused


def test_a_read_that_times_out_never_writes_into_a_later_batch(tmp_path, monkeypatch):
    """A stalled read goes on in its thread after the watchdog gave up: the buffer it writes into is never lent
    to a later batch (it would overwrite that batch's audio)."""
    import time

    import cuts.audio as audio_module
    from cuts.buffers import SharedBuffers

    cuts = []
    for i in range(4):
        sf.write(tmp_path / f"u{i}.wav", (0.05 * np.random.default_rng(i).standard_normal(SR)).astype(np.float32),
                 SR, subtype="PCM_16")
        cuts.append(recording_to_cut(Recording.from_file(tmp_path / f"u{i}.wav"), "first"))

    original = audio_module._read_row

    def stalls_on_u0(cut, row, frames):
        if cut.id.startswith("u0"):  # storage that answers after the watchdog gave up
            time.sleep(3.0)
            row[:] = 12345
            return frames
        return original(cut, row, frames)

    monkeypatch.setattr(audio_module, "_read_row", stalls_on_u0)
    ds = NestDataset(SR, None, seed=0, read_timeout=1.0, pcm16=True, buffers=SharedBuffers(1))
    items = [SamplerItem(cuts=CutSet(cuts[:2]), index=0), SamplerItem(cuts=CutSet(cuts[2:]), index=1)]
    loader = torch.utils.data.DataLoader(ds, sampler=items, batch_size=None, num_workers=1, prefetch_factor=2)
    first, second = list(loader)
    assert [c for c, _ in first.failed] == [cuts[0].id] and second.cut_ids == [c.id for c in cuts[2:]]
    expected = second.audio.clone()
    time.sleep(3.0)  # the stalled read has ended by now
    assert torch.equal(second.audio, expected) and not (second.audio == 12345).any()


def test_what_soundfile_cannot_read_as_declared_goes_to_lhotse(tmp_path, monkeypatch):
    """A file at another sampling rate than its manifest says, or one soundfile cannot open, is read by lhotse
    (which raises or uses its other backends), never taken as samples of the declared rate."""
    import cuts.audio as audio_module
    from lhotse import MonoCut
    from lhotse.audio import AudioSource

    def cut_of(path, rate=SR, frames=SR):
        rec = Recording(id=path.stem, sources=[AudioSource(type="file", channels=[0], source=str(path))],
                        sampling_rate=rate, num_samples=frames, duration=frames / rate)
        return MonoCut(id=path.stem, start=0, duration=rec.duration, channel=0, recording=rec)

    sf.write(tmp_path / "r48.wav", np.zeros(48000, np.float32), 48000, subtype="PCM_16")
    (tmp_path / "a.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + b"\x00" * 2000)
    asked = []
    monkeypatch.setattr(audio_module, "lhotse_mono", lambda cut: asked.append(cut.id) or lhotse_mono(cut))
    out, errors = read_rows([cut_of(tmp_path / "r48.wav"), cut_of(tmp_path / "a.m4a")], run)
    assert asked == ["r48", "a"] and all(e is not None for e in errors)  # lhotse's own errors, the cuts dropped


def test_a_missing_file_is_one_line_and_keeps_the_batch_in_pcm16(odd_cuts, tmp_path):
    from lhotse import MonoCut
    from lhotse.audio import AudioSource

    rec = Recording(id="gone", sources=[AudioSource(type="file", channels=[0], source=str(tmp_path / "gone.wav"))],
                    sampling_rate=SR, num_samples=SR, duration=1.0)
    gone = MonoCut(id="gone", start=0, duration=1.0, channel=0, recording=rec)
    out, errors = read_rows([gone, odd_cuts["wav"]], run, pcm16=True)
    assert out.dtype == torch.int16 and errors[1] is None
    assert isinstance(errors[0], FileNotFoundError) and str(errors[0]) == f"{tmp_path / 'gone.wav'}: no such file"


def test_a_file_no_backend_decodes_is_dropped_with_one_line_naming_the_cut(tmp_path, caplog):
    """lhotse's error for such a file is a paragraph (one line per backend it tried); the run's log and the batch's
    list of failures get one line: the cut and the first backend's reason."""
    from lhotse import MonoCut
    from lhotse.audio import AudioSource

    sf.write(tmp_path / "good.wav", (0.05 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32), SR)
    (tmp_path / "bad.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)
    rec = Recording(id="bad", sources=[AudioSource(type="file", channels=[0], source=str(tmp_path / "bad.flac"))],
                    sampling_rate=SR, num_samples=SR, duration=1.0)
    bad = MonoCut(id="bad", start=0, duration=1.0, channel=0, recording=rec)
    good = recording_to_cut(Recording.from_file(tmp_path / "good.wav"), "first")
    ds = NestDataset(SR, None, seed=0)
    batch = ds[SamplerItem(cuts=CutSet([bad, good]), index=0)]
    assert batch.cut_ids == [good.id] and [c for c, _ in batch.failed] == ["bad"]
    reason = batch.failed[0][1]
    said = [r.getMessage() for r in caplog.records if "dropping cut bad" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and reason in said[0] and "\n" not in reason, said
