"""nest-export: .nemo files written as NeMo 3.0.0 writes them, Parakeet folders, from any of our checkpoints; bad
input refused in one line before anything is written; outputs replaced only with --force, and whole."""
import io
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from nest.config import load_config
from nest.export import ExportError, export, finetune_overrides, main
from nest.io.checkpoint import load_model, save_model
from nest.objectives import build_model
from tests.conftest import ROOT, tiny_overrides
from tests.support.export import nemo_fixture, tiny


def nemo_members(path: Path) -> tuple[list[str], bytes, dict]:
    """(member names, model_config.yaml as bytes, model_weights.ckpt) of a .nemo, which must be a plain tar."""
    assert path.read_bytes()[257:262] == b"ustar"  # uncompressed, as NeMo's save_to writes it
    with tarfile.open(path, "r:") as tar:
        members = tar.getmembers()
        files = {m.name: tar.extractfile(m).read() for m in members if m.isfile()}
    return ([m.name for m in members], files["./model_config.yaml"],
            torch.load(io.BytesIO(files["./model_weights.ckpt"]), weights_only=True))


@pytest.mark.parametrize("name", ["nest", "w2vbert", "post_conv"])
def test_nemo_made_files_export_back_byte_for_byte(name, tmp_path):
    source = nemo_fixture(name)
    export(source, tmp_path / "out.nemo", "nemo")
    names, config, weights = nemo_members(tmp_path / "out.nemo")
    theirs_names, theirs_config, theirs_weights = nemo_members(source)
    assert names == theirs_names == [".", "./model_config.yaml", "./model_weights.ckpt"]
    assert config == theirs_config  # the YAML text itself
    assert list(weights) == list(theirs_weights)
    assert all(weights[k].dtype == v.dtype and torch.equal(weights[k], v) for k, v in theirs_weights.items())


@pytest.mark.parametrize("objective", ["nest", "w2vbert"])
def test_save_model_files_export_and_reload(objective, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny(objective))
    save_model(model, tmp_path / "model.pt")
    message = export(tmp_path / "model.pt", tmp_path / "out.nemo", "nemo")
    back = load_model(tmp_path / "out.nemo").state_dict()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert "+init_from_nemo_model.ssl.path=" in message and "++model.encoder.n_layers=2" in message
    assert "init_from_pretrained" in message  # says it is not a NeMo key
    export(tmp_path / "model.pt", tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_train_ckpt_exports_with_its_optimizer_settings(tiny_corpus, tmp_path):
    from nest.training.run import train

    train(load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(
        tiny_corpus, tmp_path / "exp", **{"trainer.max_steps": 2, "trainer.val_check_interval": 2})))
    ckpt = tmp_path / "exp" / "checkpoints" / "last.ckpt"
    export(ckpt, tmp_path / "out.nemo", "nemo")
    _, config, weights = nemo_members(tmp_path / "out.nemo")
    _, theirs_config, theirs_weights = nemo_members(nemo_fixture("nest"))
    config, theirs_config = yaml.safe_load(config), yaml.safe_load(theirs_config)
    assert config["optim"]["lr"] == 0.3 and config["optim"]["sched"]["warmup_steps"] == 100  # the run's
    assert {k: v for k, v in config.items() if k != "optim"} == {k: v for k, v in theirs_config.items() if k != "optim"}
    assert [(k, v.shape, v.dtype) for k, v in weights.items()] == [(k, v.shape, v.dtype) for k, v in theirs_weights.items()]
    trained = load_model(ckpt).state_dict()
    assert all(torch.equal(weights[k], trained[k]) for k in trained if k.startswith("encoder."))
    export(ckpt, tmp_path / "hf", "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                     "preprocessor_config.json"]


def test_what_nemo_cannot_hold_is_refused_before_writing(tmp_path, capsys):
    save_model(build_model(replace(tiny("nest"), targets="kmeans")), tmp_path / "kmeans.pt")
    assert main([str(tmp_path / "kmeans.pt"), str(tmp_path / "out.nemo"), "--format", "nemo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.targets=kmeans" in err and not (tmp_path / "out.nemo").exists()
    assert main([str(tmp_path / "kmeans.pt"), str(tmp_path / "hf"), "--format", "hf"]) == 0  # its encoder goes


def test_what_parakeet_cannot_express_is_refused_before_writing(tmp_path, capsys):
    cfg = tiny("nest")
    save_model(build_model(replace(cfg, encoder=replace(cfg.encoder, conv_norm_type="layer_norm"))),
               tmp_path / "model.pt")
    assert main([str(tmp_path / "model.pt"), str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.encoder.conv_norm_type=layer_norm" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # nothing written, no temporary left
    assert main([str(tmp_path / "model.pt"), str(tmp_path / "out.nemo"), "--format", "nemo"]) == 0  # NeMo has it


def test_outputs_are_replaced_only_with_force_and_whole(tmp_path, monkeypatch):
    import transformers

    source = nemo_fixture("nest")
    out, folder = tmp_path / "out.nemo", tmp_path / "hf"
    export(source, out, "nemo")
    export(source, folder, "hf")
    for target, fmt in ((out, "nemo"), (folder, "hf")):
        with pytest.raises(ExportError, match="exists: give --force"):
            export(source, target, fmt)
        export(source, target, fmt, force=True)
    with pytest.raises(ExportError, match="ending in .nemo"):
        export(source, tmp_path / "out.tar", "nemo")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export"):
        export(source, tmp_path / "mine", "hf", force=True)
    before = out.read_bytes(), (folder / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("nest.export.torch.save", fail)  # while the .nemo is written
    monkeypatch.setattr(transformers.ParakeetFeatureExtractor, "save_pretrained", fail)  # after the encoder's files
    for target, fmt in ((out, "nemo"), (folder, "hf")):
        with pytest.raises(OSError, match="disk full"):
            export(source, target, fmt, force=True)
    assert (out.read_bytes(), (folder / "model.safetensors").read_bytes()) == before  # the old outputs, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine", "out.nemo"]  # no temporaries left


@pytest.mark.parametrize("content", [None, b"not a checkpoint", "truncated"])
def test_bad_inputs_get_one_line(content, tmp_path):
    ckpt = tmp_path / "in.nemo"
    if content == "truncated":
        ckpt.write_bytes(nemo_fixture("nest").read_bytes()[:50000])
    elif content is not None:
        ckpt.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "nest.export", str(ckpt), str(tmp_path / "out.nemo"), "--format", "nemo"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "in.nemo" in r.stderr and not (tmp_path / "out.nemo").exists()


def test_finetune_overrides_name_every_encoder_setting():
    cfg = tiny("nest")
    cfg = replace(cfg, encoder=replace(cfg.encoder, n_layers=17, use_bias=False))
    overrides = dict(o.strip("'").removeprefix("++").split("=", 1) for o in finetune_overrides(cfg))
    assert overrides["model.encoder.n_layers"] == "17" and overrides["model.encoder.use_bias"] == "false"
    assert overrides["model.encoder.att_context_size"] == "[-1,-1]"
    assert {"feat_in", "d_model", "n_heads", "subsampling_factor", "subsampling_conv_channels", "ff_expansion_factor",
            "conv_kernel_size", "conv_norm_type", "xscaling", "untie_biases"} <= \
        {k.split(".")[-1] for k in overrides if k.startswith("model.encoder.")}
