"""Inputs at scale: URLs through lhotse's I/O, stalled reads, corrupt lines and shards, a shared noise set, WAV shards with
noise from the device bank resumed exactly, the warning of a run that waits for data."""
import contextlib
import gzip
import time

import pytest
import torch
from lhotse import CutSet

from cuts.dataset import TimedReader
from cuts.feed import PackedCuts
from cuts.sampler import open_cuts
from cuts.shar import ShardProblems, list_shards, shard_cuts, write_shar_index
from tests.conftest import tiny_overrides


def test_manifests_and_shar_from_urls(tiny_corpus, tmp_path):
    """``pipe:`` is lhotse's URL-like I/O that needs no server; s3://, gs:// and https:// go the same way."""
    ids = sorted(c.id for c in CutSet.from_file(tiny_corpus["train"]))
    got = sorted(c.id for c in open_cuts(f"pipe:cat {tiny_corpus['train']}", seed=0))
    assert got == ids
    out = tmp_path / "shar"
    out.mkdir()
    fields = CutSet.from_file(tiny_corpus["train"]).to_shar(out, fields={"recording": "flac"}, shard_size=10)
    write_shar_index(out, fields)
    pytest.importorskip("requests")  # smart_open reads http(s) with it (lhotse reads s3, gs... the same way)
    # A URL folder is read through its shar_index.json, here from an HTTP server on this machine.
    with http_server(out) as url:
        shards = list_shards(url)
        assert [s.cuts.rsplit("/", 1)[1] for s in shards] == [f"cuts.00000{i}.jsonl.gz" for i in range(4)]
        assert sorted(c.id for c in open_cuts(url, seed=0)) == ids
        assert sorted(c.id for c in open_cuts(f"{url}/cuts.000001.jsonl.gz", seed=0)) == sorted(
            c.id for c in shard_cuts(shards[1], False, ShardProblems()))


@contextlib.contextmanager
def http_server(folder):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_stalled_read_fails_naming_the_cut(tiny_corpus, monkeypatch):
    from cuts import dataset

    cut = next(iter(CutSet.from_file(tiny_corpus["train"])))
    monkeypatch.setattr(dataset, "load_mono", lambda c: time.sleep(5))
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=f"cut {cut.id}.*data.read_timeout"):
        TimedReader(0.2)(cut)
    assert time.perf_counter() - start < 4  # the read itself takes 5 s


def test_corrupt_manifest_lines_and_shards_are_skipped_and_counted(tiny_corpus, tmp_path):
    lines = gzip.open(tiny_corpus["train"], "rt").read().splitlines()
    broken = tmp_path / "broken.jsonl.gz"
    with gzip.open(broken, "wt") as f:
        f.write("\n".join(lines[:3] + ['{"id": "half a line', "not json at all"] + lines[3:]) + "\n")
    cuts = open_cuts(str(broken), seed=0)
    assert len(list(cuts)) == len(lines) and cuts.data.bad_lines == 2

    out = tmp_path / "shar"
    out.mkdir()
    CutSet.from_file(tiny_corpus["train"]).to_shar(out, fields={"recording": "flac"}, shard_size=10)
    shards = list_shards(str(out))
    data = shards[1].recording
    with open(data, "r+b") as f:  # the second shard's tar is cut short
        f.truncate(len(open(data, "rb").read()) // 3)
    problems = ShardProblems()
    read = [c.id for s in shards for c in shard_cuts(s, True, problems)]
    assert len(lines) - 10 <= len(read) < len(lines)  # the rest of the broken shard is lost, the others are whole
    assert len(problems.take()) == 1


def test_packed_noise_is_compact_and_gives_back_the_cuts(tiny_corpus):
    cuts = list(CutSet.from_file(tiny_corpus["train"]))
    packed = PackedCuts(cuts)
    assert len(packed) == len(cuts)
    for i in (0, len(cuts) // 2, len(cuts) - 1):
        assert packed[i].to_dict() == cuts[i].to_dict()
    assert len(packed.blob) / len(cuts) < 1000  # bytes a cut, shared by forked workers


def test_resume_auto_takes_last_ckpt_not_lightnings_signal_handler_checkpoints(tmp_path):
    # hpc_ckpt files come from Lightning's SLURM handler, which saves wherever each rank is (nest.training.saving replaces
    # it); a stale one, even newer, is not resumed from.
    from nest.config import load_config
    from nest.training.preflight import find_resume

    cfg = load_config(None, ["resume=auto"])
    assert find_resume(cfg, tmp_path) is None
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"state_dict": {}}, ckpts / "last.ckpt")  # start-up checks that it loads
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"y")
    assert find_resume(cfg, tmp_path) == str(ckpts / "last.ckpt")


def test_the_read_watchdog_works_in_a_worker_forked_after_the_parent_read(tiny_corpus):
    # A forked process inherits the parent's thread pool object but not its thread: reads would wait forever.
    import multiprocessing

    cut = next(iter(CutSet.from_file(tiny_corpus["train"])))
    reader = TimedReader(3.0)
    reader(cut)  # the parent starts its watchdog thread
    ctx = multiprocessing.get_context("fork")
    result = ctx.SimpleQueue()
    child = ctx.Process(target=lambda: result.put(_length_or_error(reader, cut)))  # inherited, not pickled
    child.start()
    child.join(30)
    assert result.get() == cut.num_samples


def _length_or_error(reader, cut):
    try:
        return len(reader(cut))
    except Exception as e:
        return repr(e)


def test_kill_and_resume_from_wav_shards_mixing_noise_from_the_device_bank(tiny_corpus, tmp_path):
    from cuts.sources import export_shar
    from tests.support.runs import records, trace_run

    export_shar(tiny_corpus["train"], tmp_path / "shar", shard_size=4, seed=2, audio_format="wav")
    common = {"trainer.max_steps": 10, "trainer.checkpoint_every_n_steps": 4, "data.num_workers": 2,
              "data.train_cuts": f"[{tmp_path / 'shar'}]", "data.val_cuts": "[]", "data.batch_duration": 10,
              "data.mix_on_device": "true", "data.noise_bank_seconds": 20, "data.noise.prob": 1.0}
    assert trace_run(tmp_path / "a.jsonl", -1, tiny_overrides(tiny_corpus, tmp_path / "a", **common)) == 0
    b = tiny_overrides(tiny_corpus, tmp_path / "b", **common, resume="auto")
    assert trace_run(tmp_path / "b.jsonl", 6, b) == -9  # killed after step 6; last checkpoint at step 4
    assert trace_run(tmp_path / "b.jsonl", -1, b) == 0
    a = {r["step"]: r for r in records(tmp_path / "a.jsonl")}
    resumed = {r["step"]: r for r in records(tmp_path / "b.jsonl")}  # the last record of each step
    assert sorted(a) == sorted(resumed) == list(range(1, 11))
    for step, r in a.items():  # the same cuts, and the same noise: the loss depends on it
        assert resumed[step]["cut_ids"] == r["cut_ids"], step
        assert resumed[step]["loss"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-6), step


def test_a_run_waiting_for_data_says_so_once_with_the_knobs(tiny_corpus, tmp_path, monkeypatch, caplog):
    from cuts.dataset import NestDataset
    from nest.config import load_config
    from nest.training.run import train
    from tests.conftest import ROOT

    load = NestDataset.__getitem__

    def slow(self, item):  # storage slower than the step: the loop waits for every batch
        time.sleep(0.3)
        return load(self, item)

    monkeypatch.setattr(NestDataset, "__getitem__", slow)
    cfg = load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(tiny_corpus, tmp_path / "exp", **{
        "trainer.max_steps": 9, "trainer.log_every_n_steps": 3, "data.num_workers": 0, "data.val_cuts": "[]"}))
    train(cfg)
    said = [r.getMessage() for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(said) == 1
    assert "data.num_workers (now 0" in said[0] and "--audio-format wav" in said[0] and "data.mix_on_device" in said[0]
