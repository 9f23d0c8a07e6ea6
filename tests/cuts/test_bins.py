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
    assert one.upper == [3.2] and one.duration_bins == []


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
