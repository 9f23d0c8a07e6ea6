"""Bins: exact edges (the longest cut inside the last bucket), no duplicate or empty buckets, capped to the data."""
import logging
from bisect import bisect_left

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuts.bins import Bins, bins_from_durations, estimate_bins, manifest_durations


def bucket_counts(durations, bins: Bins) -> list[int]:
    """Cuts per bucket as lhotse's samplers assign them (bisect_left over the edges)."""
    counts = [0] * len(bins.upper)
    for d in durations:
        counts[bisect_left(bins.duration_bins, d)] += 1
    return counts


def check(durations, bins: Bins, min_cuts: int) -> None:
    assert bins.upper == sorted(set(bins.upper))  # strictly increasing: no duplicate bucket
    assert bins.upper[-1] == max(durations) == bins.max_duration  # exact, not a float32 neighbour
    counts = bucket_counts(durations, bins)
    assert all(c >= min(min_cuts, len(durations)) for c in counts)  # no empty (or tiny) bucket
    assert all(d <= bins.upper[-1] for d in durations)
    assert sum(counts) == len(durations) == bins.num_cuts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.1, 40.0, allow_nan=False).map(lambda x: round(x, 3)), min_size=1, max_size=300),
       st.integers(1, 40), st.integers(1, 10))
def test_bins_invariants(durations, num_buckets, min_cuts):
    bins = bins_from_durations(np.array(durations), num_buckets, min_cuts)
    check(durations, bins, min_cuts)
    assert len(bins.upper) <= num_buckets


def test_float32_neighbour_of_the_longest_is_gone(tmp_path):
    durations = np.r_[np.linspace(1.0, 15.0, 500), 16.04]
    bins = bins_from_durations(durations, 10)
    assert bins.upper[-1] == 16.04 and 16.040000915 not in bins.upper
    bins.save(tmp_path / "bins.yaml")
    assert Bins.load(tmp_path / "bins.yaml").upper == bins.upper  # stored exactly (repr of a float64)


def test_many_equal_durations_give_no_duplicate_edges():
    durations = np.r_[np.full(900, 10.0), np.linspace(1.0, 9.9, 100)]  # 10 s windows, the usual noise set
    bins = bins_from_durations(durations, 30)
    check(durations, bins, 5)
    assert bins.upper[-1] == 10.0 and bins.upper.count(10.0) == 1


def test_small_corpus_gets_few_buckets_with_a_message(caplog):
    durations = np.random.default_rng(0).uniform(1.0, 5.0, 20)
    with caplog.at_level(logging.WARNING):
        bins = bins_from_durations(durations, 30)
    assert 1 < len(bins.upper) <= 4
    assert "20 cuts fill" in caplog.text and "not the 30 asked for" in caplog.text
    one = bins_from_durations(np.array([3.2]), 30)
    assert one.upper == [3.2] and one.duration_bins == [3.2]  # lhotse warns on no boundary; none is above 3.2


def test_empty_and_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        bins_from_durations(np.zeros(0), 30)
    with pytest.raises(ValueError, match="at least 1"):
        bins_from_durations(np.ones(10), 0)


def test_large_corpus_keeps_the_buckets_asked_for_and_equal_durations():
    durations = np.clip(np.random.default_rng(0).gamma(4.0, 3.0, 100_000), 1.0, 35.0)
    bins = bins_from_durations(durations, 30)
    assert len(bins.upper) == 30
    check(durations, bins, 5)
    totals = np.bincount(np.searchsorted(bins.duration_bins, durations, side="left"), weights=durations)
    assert totals.max() / totals.mean() < 1.5  # about equal total duration per bucket


def test_streaming_estimate_and_manifest_reader_agree(tmp_path):
    from lhotse import CutSet, MonoCut

    durations = np.round(np.random.default_rng(1).uniform(0.5, 20.0, 300), 4)
    cuts = CutSet([MonoCut(id=f"spk/{i}", start=0.0, duration=float(d), channel=0) for i, d in enumerate(durations)])
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    bins, seen = estimate_bins(CutSet.from_jsonl_lazy(tmp_path / "cuts.jsonl.gz"), 8)
    assert np.array_equal(seen, durations) and np.array_equal(manifest_durations(tmp_path / "cuts.jsonl.gz"), durations)
    assert bins == bins_from_durations(durations, 8)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0.5, 30.0, allow_nan=False).map(lambda x: round(x, 2)), min_size=1, max_size=300),
       st.integers(1, 40), st.sampled_from([5.0, 40.0, 600.0]), st.sampled_from([1.0, 2.0, 4.0]))
def test_every_bucket_holds_several_batches_of_audio(durations, num_buckets, batch_duration, min_batches):
    bins = bins_from_durations(np.array(durations), num_buckets, 1, batch_duration, min_batches)
    check(durations, bins, 1)
    edges = np.searchsorted(bins.duration_bins, durations, side="left")
    seconds = np.bincount(edges, weights=durations, minlength=len(bins.upper))[: len(bins.upper)]
    assert len(bins.upper) == 1 or seconds.min() >= min_batches * batch_duration
    assert bins.batch_duration == batch_duration


def test_a_tiny_corpus_gets_one_bucket_its_steps_and_a_batch_duration_that_trains(caplog):
    from cuts.config import DataConfig
    from cuts.report import training_bins

    durations = np.random.default_rng(0).uniform(1.8, 2.9, 24)  # one minute of speech
    with caplog.at_level(logging.WARNING):
        bins, info = training_bins(durations, DataConfig(batch_duration=40, min_duration=0.5), 30)
    assert bins.upper == [durations.max()] and info["tiny"] and info["steps_per_epoch"] >= 1
    assert "the corpus is tiny for data.batch_duration=40 s" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, info = training_bins(durations, DataConfig(), 30)  # the default 600 s: no whole batch at all
    assert info["steps_per_epoch"] == 0 and info["cuts_in_no_batch"] == 24
    suggested = float(caplog.text.split("set data.batch_duration=")[1].split()[0])
    _, info = training_bins(durations, DataConfig(batch_duration=suggested), 30)
    assert info["steps_per_epoch"] >= 2  # the suggestion trains


def test_bins_leave_out_what_training_drops_and_say_so(caplog):
    from cuts.config import DataConfig
    from cuts.report import training_bins

    durations = np.r_[np.linspace(1.0, 20.0, 400), [0.3, 0.4, 1200.0]]
    with caplog.at_level(logging.WARNING):
        bins, info = training_bins(durations, DataConfig(batch_duration=40), 30)
    assert bins.upper[-1] == 20.0 and info["cuts_outside_duration_range"] == 3 and not info["tiny"]
    assert "3 of 403 cuts" in caplog.text and "--window" in caplog.text
    with pytest.raises(ValueError, match="none of the 2 cuts lies within"):
        training_bins(np.array([0.2, 0.3]), DataConfig(), 30)
    # Within data.max_duration but longer than one batch holds: training drops them, so the bins do too.
    with caplog.at_level(logging.WARNING):
        bins, info = training_bins(np.r_[np.linspace(1.0, 20.0, 400), [45.0, 50.0]], DataConfig(batch_duration=40), 30)
    assert bins.upper[-1] == 20.0 and info["cuts_outside_duration_range"] == 2
    assert "the 40 s one batch of data.batch_duration=40 s holds" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("bucket_upper_duration: [1, 2\n", "bins.yaml:2 is not valid YAML"),
    ("- 1\n- 2\n", "needs a bucket_upper_duration list"),
    ("bucket_upper_duration: [3, 2]\n", "strictly increasing"),
    ("bucket_upper_duration: [1, .nan]\n", "strictly increasing list of positive"),
    ("bucket_upper_duration: [a]\n", "needs a bucket_upper_duration list"),
    ("bucket_upper_duration: [1]\nnum_cuts: many\n", "numbers for num_cuts"),
    ("", "needs a bucket_upper_duration list"),
])
def test_a_broken_bins_file_is_one_error_naming_it(tmp_path, text, message):
    (tmp_path / "bins.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        Bins.load(tmp_path / "bins.yaml")


def test_bins_file_round_trip_keeps_the_batch_duration(tmp_path):
    bins = bins_from_durations(np.linspace(1, 10, 200), 8, batch_duration=40.0)
    bins.save(tmp_path / "bins.yaml")
    assert Bins.load(tmp_path / "bins.yaml") == bins
    (tmp_path / "bins.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a text file"):
        Bins.load(tmp_path / "bins.bin")
    with pytest.raises(ValueError, match="is a folder"):
        Bins.load(tmp_path)
