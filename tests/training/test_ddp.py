"""Two gloo ranks x two dataloader workers on CPU, from Shar and from JSON lines: the data is split exactly,
skipped steps keep replicas identical, a failing rank does not hang the others, resume is exact."""
import json
import re
from collections import defaultdict

import pytest
import torch
from lhotse import CutSet

from tests.conftest import tiny_overrides
from tests.support.runs import ddp_run, records


@pytest.fixture(scope="module")
def shar(tiny_corpus, tmp_path_factory):
    """The tiny corpus's train cuts as Shar shards of 4 cuts (9 shards for 4 streams)."""
    out = tmp_path_factory.mktemp("shar")
    CutSet.from_file(tiny_corpus["train"]).to_shar(out, fields={"recording": "flac"}, shard_size=4)
    return out


def options(tiny_corpus, exp, train_cuts, **extra):
    # No cut is longer than one batch holds (training would leave it out, saying so).
    values = {"data.train_cuts": f"[{train_cuts}]", "trainer.strategy": "ddp", "trainer.devices": 2,
              "data.num_workers": 2, "data.val_cuts": "[]", "data.batch_duration": 10, "data.drop_last": "false",
              "data.max_duration": 10,
              "trainer.checkpoint_every_n_steps": 100, "trainer.log_every_n_steps": 5, **extra}
    return tiny_overrides(tiny_corpus, exp, **values)


@pytest.mark.parametrize("kind", ["shar", "jsonl"])
def test_each_cut_once_per_epoch_across_ranks_and_workers(kind, tiny_corpus, shar, tmp_path):
    source = shar if kind == "shar" else tiny_corpus["train"]
    extra = {"data.val_cuts": f"[{tiny_corpus['dev']}]", "trainer.val_check_interval": 10,
             "trainer.limit_val_batches": 2}
    ddp_run(tmp_path / "t.jsonl", options(tiny_corpus, tmp_path / "exp", source, **{"trainer.max_steps": 24, **extra}),
            env={"NEST_TEST_DUMP": str(tmp_path)})
    recs = records(tmp_path / "t.jsonl")
    by_rank = defaultdict(list)
    for r in recs:
        by_rank[r["rank"]].append(r)
    assert len(by_rank[0]) == len(by_rank[1]) == 24
    everything = sorted(c.id for c in CutSet.from_file(tiny_corpus["train"]) if 0.5 <= c.duration <= 10)
    streams = {(r["rank"], r["worker"]) for r in recs}
    seen = []
    for rank, worker in streams:  # each stream's first epoch (a Shar stream has its own epochs)
        seen += [i for r in recs if (r["rank"], r["worker"]) == (rank, worker) and r["epoch"] == 0 for i in r["cut_ids"]]
    if kind == "jsonl":  # one global stream: the first epoch of every rank together
        assert streams == {(0, -1), (1, -1)}
    else:
        assert streams == {(0, 0), (0, 1), (1, 0), (1, 1)}
        assigned = {rank: [json.loads(x) for x in (tmp_path / f"assigned_rank{rank}.txt").read_text().splitlines()]
                    for rank in (0, 1)}
        first = [{t for a in assigned[rank] if a["epoch"] == 0 for t in a["tars"]} for rank in (0, 1)]
        assert first[0] and first[1] and not first[0] & first[1]  # an epoch's shards are split between the ranks
        for rank in (0, 1):  # and a rank opens only the shards it was dealt
            opened = set((tmp_path / f"opened_rank{rank}.txt").read_text().split())
            assert opened <= {t for a in assigned[rank] for t in a["tars"]}
    # With drop_last=false, lhotse's sampler ends an epoch that has fewer cuts left than ranks by giving a
    # rank a copy of one (id suffixed _dupN): at most world size - 1 copies, of cuts of that epoch.
    copies = [i for i in seen if re.fullmatch(r".+_dup\d+", i)]
    assert len(copies) <= 1 and all(re.sub(r"_dup\d+$", "", c) in seen for c in copies)
    assert sorted(i for i in seen if i not in copies) == everything  # every cut once in the epoch, none twice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "val_loss" in EventAccumulator(str(tmp_path / "exp" / "tb")).Reload().Tags()["scalars"]


def test_a_non_finite_micro_batch_on_one_rank_keeps_replicas_identical(tiny_corpus, shar, tmp_path):
    ddp_run(tmp_path / "t.jsonl", options(tiny_corpus, tmp_path / "exp", shar, **{
        "trainer.max_steps": 4, "trainer.accumulate_grad_batches": 2, "data.num_workers": 0}),
        env={"NEST_TEST_DUMP": str(tmp_path), "NEST_TEST_NAN": "1:3"})
    a, b = (torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in a:
        if "running_" not in k and "num_batches" not in k:  # each rank keeps its own BatchNorm statistics on CPU
            assert torch.equal(a[k], b[k]), k
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4


def test_a_rank_whose_cuts_all_fail_does_not_hang_the_others(tiny_corpus, tmp_path):
    ddp_run(tmp_path / "t.jsonl", options(tiny_corpus, tmp_path / "exp", tiny_corpus["train"], **{
        "trainer.max_steps": 4, "data.num_workers": 0, "data.max_failed_fraction": 1.0}),
        env={"NEST_TEST_FAIL_RANK": "1"}, timeout=300)
    recs = records(tmp_path / "t.jsonl")
    assert all(r["cut_ids"] == [] and r["failed"] > 0 for r in recs if r["rank"] == 1)
    assert all(r["cut_ids"] for r in recs if r["rank"] == 0) and len(recs) == 8
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert summary["failed_cuts"] == sum(r["failed"] for r in recs)  # counted over both ranks


def test_sigkill_then_resume_on_two_ranks_from_shar_sees_the_same_cuts(tiny_corpus, shar, tmp_path):
    common = {"trainer.max_steps": 10, "trainer.checkpoint_every_n_steps": 4}
    ddp_run(tmp_path / "a.jsonl", options(tiny_corpus, tmp_path / "a", shar, **common))
    b = options(tiny_corpus, tmp_path / "b", shar, resume="auto", **common)
    ddp_run(tmp_path / "b.jsonl", b, kill_at=6)  # killed after step 6; last checkpoint at step 4
    ddp_run(tmp_path / "b.jsonl", b)
    last = {}
    for r in records(tmp_path / "b.jsonl"):  # a resumed run replays the steps after its checkpoint
        last[(r["rank"], r["step"])] = r
    uninterrupted = {(r["rank"], r["step"]): r for r in records(tmp_path / "a.jsonl")}
    assert sorted(last) == sorted(uninterrupted) and len(last) == 20
    for key, r in uninterrupted.items():
        assert last[key]["cut_ids"] == r["cut_ids"], key
        assert last[key]["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), key


def test_resume_with_another_world_size_starts_the_next_epoch(tiny_corpus, tmp_path):
    common = {"trainer.checkpoint_every_n_steps": 3, "data.num_workers": 0, "resume": "auto"}
    ddp_run(tmp_path / "t.jsonl", options(tiny_corpus, tmp_path / "exp", tiny_corpus["train"],
                                          **{"trainer.max_steps": 3, **common}))
    before = records(tmp_path / "t.jsonl")
    r = ddp_run(tmp_path / "t.jsonl", options(tiny_corpus, tmp_path / "exp", tiny_corpus["train"],
                                              **{"trainer.max_steps": 5, "trainer.devices": 1,
                                                 "trainer.strategy": "auto", **common}))
    after = records(tmp_path / "t.jsonl")[len(before):]
    assert "world_size: 2 -> 1" in r.stderr and "continues with epoch 1" in r.stderr
    assert [(x["epoch"], x["index"]) for x in after] == [(1, 0), (1, 1)]
    assert {x["epoch"] for x in before} == {0}


def test_no_host_sync_in_a_ddp_step_that_does_not_log(tiny_corpus, shar, tmp_path):
    """Lightning's whole loop iteration (its SIGTERM broadcast, the step, DDP, callbacks), not only our step, with
    the synchronised BatchNorm (trainer.sync_batchnorm=true, the default) and our DDP options."""
    ddp_run(tmp_path / "t.jsonl", options(tiny_corpus, tmp_path / "exp", shar, **{
        "trainer.max_steps": 12, "trainer.log_every_n_steps": 5}), env={"NEST_TEST_SYNCS": "1"})
    recs = records(tmp_path / "t.jsonl")
    assert {r["rank"] for r in recs} == {0, 1} and sum(r["logging"] for r in recs) == 4  # steps 5 and 10, 2 ranks
    assert all(r["synced_bn"] == 2 for r in recs)  # nest_tiny's 2 layers
    assert all(r["ddp"] == {"broadcast_buffers": False, "gradient_as_bucket_view": True} for r in recs)
    quiet = [r for r in recs if not r["logging"] and r["step"] > 1]  # the first step builds the device state
    assert len(quiet) >= 16 and all(r["syncs"] == {} for r in quiet), [(r["step"], r["syncs"]) for r in quiet]
    # Logging steps: Lightning's SIGTERM flag, broadcast and read (lightning_private), and no read per logged number
    # (the meters' one packed read, .tolist(), is not an op on CPU; on CUDA it is the one device-to-host copy).
    logging = [r["syncs"] for r in recs if r["logging"]]
    assert logging == [{"aten._local_scalar_dense.default": 1}] * 4, logging
