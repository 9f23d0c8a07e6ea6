"""The w2v-BERT objective through the same training loop: loss goes down, exact resume, DDP, extraction."""
import json

import pytest
import torch

from nest.config import load_config
from nest.extract import extract, load_pretrained_encoder
from nest.training.run import train
from tests.conftest import ROOT, tiny_overrides
from tests.support.runs import ddp_run, records


def w2v(corpus, exp, **extra):
    return tiny_overrides(corpus, exp, **{"data.num_workers": 0, "data.val_cuts": "[]", **extra})


def test_w2vbert_trains_and_its_checkpoint_extracts(tiny_corpus, tmp_path):
    summary = train(load_config(ROOT / "configs" / "w2vbert_tiny.yaml", w2v(tiny_corpus, tmp_path / "exp", **{
        "trainer.max_steps": 40, "trainer.log_every_n_steps": 10, "trainer.checkpoint_every_n_steps": 40})))
    assert summary["steps"] == 40 and summary["last_loss"] < summary["first_loss"]
    ckpt = tmp_path / "exp" / "checkpoints" / "last.ckpt"
    from lhotse import CutSet

    cuts = CutSet.from_file(tiny_corpus["dev"]).subset(first=2)
    assert extract(str(ckpt), cuts, tmp_path / "feats", layers="-1") == 2
    encoder = load_pretrained_encoder(ckpt)
    out, lens = encoder(torch.zeros(1, 16000), torch.tensor([16000]))
    assert out.shape[1] == 64 and not encoder.training


def test_w2vbert_resume_is_exact_and_ddp_keeps_replicas_identical(tiny_corpus, tmp_path):
    def run(trace, exp, kill_at=-1, **extra):
        overrides = w2v(tiny_corpus, exp, **{"trainer.max_steps": 8, "trainer.checkpoint_every_n_steps": 3, **extra})
        return ddp_run(trace, ["--config", "configs/w2vbert_tiny.yaml", *overrides], kill_at=kill_at)

    run(tmp_path / "a.jsonl", tmp_path / "a")
    run(tmp_path / "b.jsonl", tmp_path / "b", kill_at=5, resume="auto")
    run(tmp_path / "b.jsonl", tmp_path / "b", resume="auto")
    a = {r["step"]: r for r in records(tmp_path / "a.jsonl")}
    b = {r["step"]: r for r in records(tmp_path / "b.jsonl")}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert a[step]["cut_ids"] == b[step]["cut_ids"]
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step

    ddp_run(tmp_path / "d.jsonl", ["--config", "configs/w2vbert_tiny.yaml", *w2v(tiny_corpus, tmp_path / "d", **{
        "trainer.max_steps": 3, "trainer.strategy": "ddp", "trainer.devices": 2})],
        env={"NEST_TEST_DUMP": str(tmp_path)})
    p0, p1 = (torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(p0[k], p1[k]) for k in p0 if "running_" not in k and "num_batches" not in k)
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["steps"] == 3
