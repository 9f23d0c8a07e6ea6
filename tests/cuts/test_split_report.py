"""Train/dev split by recording (exact fraction, floor for train) and the bucket report, which must batch
as the training sampler does."""
import json

import numpy as np
import pytest
import yaml
from lhotse import CutSet, MonoCut, Recording
from lhotse.audio import AudioSource

from cuts.bins import bins_from_durations
from cuts.cli import main as prepare_main
from cuts.config import DataConfig
from cuts.report import bucket_report
from cuts.sampler import build_sampler
from cuts.split import EmptySplit, split_cuts


def write_cuts(path, durations, windows=1):
    """Cuts of fake recordings (no audio behind them); ``windows`` cuts per recording."""
    cuts = []
    for i, d in enumerate(durations):
        rec = Recording(id=f"spk{i % 7}/{i:04d}", sources=[AudioSource("file", [0], f"/none/{i}.wav")],
                        sampling_rate=16000, num_samples=int(d * windows * 16000), duration=d * windows)
        cuts += [MonoCut(id=f"{rec.id}-{w}", start=w * d, duration=float(d), channel=0, recording=rec)
                 for w in range(windows)]
    CutSet(cuts).to_file(path)
    return cuts


def side_of(out):
    return {s: [c.id for c in CutSet.from_file(out / f"{s}.jsonl.gz")] for s in ("train", "dev")}


def test_split_is_exact_by_recording_and_keeps_order(tmp_path):
    cuts = write_cuts(tmp_path / "all.jsonl.gz", np.linspace(1, 9, 100), windows=3)
    summary = split_cuts(tmp_path / "all.jsonl.gz", tmp_path / "out", dev_fraction=0.1, seed=0)
    assert summary["recordings"] == {"train": 90, "dev": 10} and summary["cuts"] == {"train": 270, "dev": 30}
    sides = side_of(tmp_path / "out")
    rec = {c.id: c.recording_id for c in cuts}
    assert not {rec[i] for i in sides["train"]} & {rec[i] for i in sides["dev"]}  # no recording on both sides
    order = [c.id for c in cuts]
    assert sides["train"] == [i for i in order if i in set(sides["train"])]  # input order kept
    other = split_cuts(tmp_path / "all.jsonl.gz", tmp_path / "out2", dev_fraction=0.1, seed=1)
    assert other["recordings"]["dev"] == 10 and side_of(tmp_path / "out2")["dev"] != sides["dev"]


@pytest.mark.parametrize("n, fraction, dev", [(3, 0.01, 1), (1, 0.01, 0), (20, 0.9, 10), (20, 0.0, 0)])
def test_small_corpus_dev_floor_for_train(tmp_path, n, fraction, dev):
    write_cuts(tmp_path / "all.jsonl.gz", np.full(n, 2.0))
    summary = split_cuts(tmp_path / "all.jsonl.gz", tmp_path / "out", dev_fraction=fraction)
    assert summary["recordings"] == {"train": n - dev, "dev": dev}


def test_one_recording_leaves_dev_empty_and_says_so(tmp_path, caplog):
    write_cuts(tmp_path / "all.jsonl.gz", [2.0], windows=3)
    summary = split_cuts(tmp_path / "all.jsonl.gz", tmp_path / "out", dev_fraction=0.1)
    assert summary["cuts"] == {"train": 3, "dev": 0} and "dev gets none of 1 recording(s)" in caplog.text


def test_empty_input_and_bad_fraction_fail(tmp_path):
    (tmp_path / "empty.jsonl.gz").write_bytes(b"")
    with pytest.raises(EmptySplit, match="no cuts"):
        split_cuts(tmp_path / "empty.jsonl.gz", tmp_path / "out", dev_fraction=0.1)
    write_cuts(tmp_path / "all.jsonl.gz", np.full(5, 2.0))
    with pytest.raises(ValueError, match=r"--dev-fraction must be in \[0, 1\)"):
        split_cuts(tmp_path / "all.jsonl.gz", tmp_path / "out", dev_fraction=1.0)
    assert prepare_main(["split", str(tmp_path / "empty.jsonl.gz"), str(tmp_path / "out")]) == 1


@pytest.mark.parametrize("bad", [None, "1.0", -1.0, True])
def test_a_cut_without_a_usable_duration_is_named_before_anything_is_written(tmp_path, bad):
    write_cuts(tmp_path / "all.jsonl", [1.0, 2.0, 3.0])
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    broken = json.loads(lines[2])
    broken["duration"] = bad
    lines[2] = json.dumps(broken)
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"all\.jsonl:3: duration is"):
        split_cuts(tmp_path / "all.jsonl", tmp_path / "out", dev_fraction=0.3)
    assert not (tmp_path / "out" / "train.jsonl.gz").exists()


def test_report_counts_the_steps_the_training_sampler_makes(tmp_path):
    durations = np.round(np.random.default_rng(0).uniform(1.0, 12.0, 400), 3)
    write_cuts(tmp_path / "cuts.jsonl.gz", durations)
    bins = bins_from_durations(durations, 6)
    bins.save(tmp_path / "bins.yaml")
    for world_size in (1, 2):
        cfg = DataConfig(batch_duration=60.0, min_duration=2.0, max_duration=11.0, drop_last=True)
        sampler = build_sampler(CutSet.from_file(tmp_path / "cuts.jsonl.gz"), cfg, train=True, seed=0,
                                world_size=world_size, rank=0, bins=bins)
        sampler.set_epoch(0)
        true_steps = sum(1 for _ in sampler)
        rows = bucket_report(durations, bins.upper, None, 60.0, 0, world_size=world_size, min_duration=2.0,
                             max_duration=11.0)
        assert sum(r["steps_per_epoch"] for r in rows) == true_steps > 0
        assert sum(r["cuts"] for r in rows) == int(((durations >= 2.0) & (durations <= 11.0)).sum())
        assert not any(r["never_fills"] for r in rows)


def test_report_says_when_a_bucket_never_fills_a_batch(tmp_path, capsys):
    durations = np.r_[np.full(200, 2.0), [30.0, 31.0, 32.0]]
    write_cuts(tmp_path / "cuts.jsonl.gz", durations)
    (tmp_path / "bs.yaml").write_text(yaml.safe_dump({"bucket_upper_duration": [2.0, 32.0], "batch_sizes": [16, 4]}))
    assert prepare_main(["report", str(tmp_path / "cuts.jsonl.gz"), "--batch-sizes", str(tmp_path / "bs.yaml"),
                         "--png", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["steps_per_epoch"] == 200 // 16 and result["buckets_never_filling"] == [1]
    assert "bucket 1 (up to 32.0 s): its 3 cuts never fill a batch" in out.err and (tmp_path / "r.png").is_file()
