"""cuts/io.py: atomic writes, the lazy JSON-lines reader, the external shuffle, and prepare's shuffled output."""
import gzip
import json
import os
import stat

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from cuts.io import ExternalShuffle, ManifestError, atomic_write, iter_jsonl
from cuts.prepare import prepare_audio_dir


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "cuts.jsonl.gz"
    with atomic_write(path) as f:
        f.write('{"id": "a"}\n')
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('{"id": "b"}\n')
            raise RuntimeError("interrupted")
    assert gzip.decompress(path.read_bytes()).decode() == '{"id": "a"}\n'  # the old file, intact
    assert os.listdir(path.parent) == ["cuts.jsonl.gz"]  # no temporary file left behind
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others, as open() would make it


def test_iter_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": 1}\n\n[1, 2]\n{"id": 2\n{"id": 3}\n'))
    problems = []
    got = list(iter_jsonl(path, on_error=lambda where, problem: problems.append((where, problem))))
    assert got == [(f"{path}:1", {"id": 1}), (f"{path}:5", {"id": 3})]
    assert [w for w, _ in problems] == [f"{path}:3", f"{path}:4"] and "not an object" in problems[0][1]
    with pytest.raises(ManifestError, match=f"{path}:3: a JSON list"):
        list(iter_jsonl(path))
    plain = tmp_path / "m.json"  # a plain file is read the same, whatever its name
    plain.write_text('{"a": 1}\n')
    assert list(iter_jsonl(plain)) == [(f"{plain}:1", {"a": 1})]


def test_iter_jsonl_cut_short_gzip(tmp_path):
    data = gzip.compress(b"".join(b'{"id": %d}\n' % i for i in range(1000)))
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="cut short"):
        list(iter_jsonl(path))


@pytest.mark.parametrize("buffer_bytes", [50, 1 << 20])
def test_external_shuffle_is_a_seeded_permutation(tmp_path, buffer_bytes):
    def order(seed):
        shuffle = ExternalShuffle(tmp_path / "tmp", seed, num_shards=8, buffer_bytes=buffer_bytes)
        for i in range(500):
            shuffle.add(f"k{i}", f"line {i}")
        return list(shuffle.shuffled())

    first = order(0)
    assert sorted(first) == sorted(f"line {i}" for i in range(500))  # every line once, whatever the flushes
    assert first == order(0) and first != order(1)
    assert first != [f"line {i}" for i in range(500)]
    assert not (tmp_path / "tmp").exists()  # temporary shards removed


def test_repeated_keys_meet_in_one_shard_in_order(tmp_path):
    shuffle = ExternalShuffle(tmp_path / "tmp", 0, num_shards=4, buffer_bytes=10)
    for i in range(40):
        shuffle.add(f"k{i % 10}", f"k{i % 10} {i}")
    for _, lines in shuffle.shards():
        for key in {x.split()[0] for x in lines}:
            mine = [int(x.split()[1]) for x in lines if x.split()[0] == key]
            assert len(mine) == 4 and mine == sorted(mine)


def test_prepared_cuts_are_shuffled_with_the_seed(tmp_path):
    for i in range(40):
        path = tmp_path / "src" / f"d{i // 10}" / f"{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.1 * np.random.default_rng(i).standard_normal(1600)).astype(np.float32), 16000)

    def ids(seed, out):
        prepare_audio_dir(tmp_path / "src", tmp_path / out, seed=seed)
        return [c.id for c in CutSet.from_file(tmp_path / out / "cuts.jsonl.gz")]

    a, b, c = ids(0, "a"), ids(0, "b"), ids(1, "c")
    assert a != sorted(a)  # not in folder order
    assert a == b and a != c and sorted(a) == sorted(c)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["shuffle_seed"] == 0


def test_one_line_escapes_what_would_break_an_error_line():
    from cuts.console import one_line

    text = one_line(ValueError("key '\x85' in a.jsonl:3\u2028and \x1e; é 中\n"))
    assert len(text.splitlines()) == 1 and text == "key '\\x85' in a.jsonl:3\\u2028and \\x1e; é 中"


def test_a_bad_manifest_line_is_said_once_not_every_epoch(tmp_path, caplog):
    import logging

    from cuts.sampler import ManifestCuts

    (tmp_path / "cuts.jsonl").write_text('{"id": "a", "start": 0, "duration": 1\n')
    cuts = ManifestCuts(str(tmp_path / "cuts.jsonl"))
    with caplog.at_level(logging.WARNING, logger="cuts.sampler"):
        for _ in range(3):  # three epochs
            assert list(cuts) == []
    assert cuts.bad_lines == 3 and caplog.text.count("cuts.jsonl:1: bad manifest line") == 1
    assert "not valid JSON (Expecting ',' delimiter: column" in caplog.text
