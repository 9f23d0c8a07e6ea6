"""The w2vbert objective's configs, our checkpoints and NeMo .nemo files of SpeechEncDecSelfSupervisedModel."""
import copy
import io
import tarfile
from dataclasses import asdict

import pytest
import torch
import yaml

from nest.config import load_config
from nest.errors import CheckpointError, ConfigError
from nest.extract import load_pretrained_encoder
from nest.io import load_model, load_nemo, save_model
from nest.objectives import build_model, count_parameters, NestModel
from nest.objectives.w2vbert import W2vBertModel
from tests.conftest import ROOT, W2VBERT_FIXTURES
from tests.objectives.test_w2vbert import tiny_config

NEMO = W2VBERT_FIXTURES / "w2vbert_tiny.nemo"
needs_nemo = pytest.mark.skipif(not NEMO.is_file(), reason=f"no {NEMO}")


def test_configs_build_w2vbert_models():
    cfg = load_config(ROOT / "configs" / "w2vbert_tiny.yaml")
    assert cfg.model.objective == "w2vbert" and cfg.data.noise.prob == 0
    assert isinstance(build_model(cfg.model), W2vBertModel)
    cfg = load_config(ROOT / "configs" / "w2vbert_fast-conformer.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.mlm_decoder.decoder_layers[0].out_channels == 300**2 + 1  # ids of 2 groups of 300, + NeMo's blank
    assert model.quantizer.weight_proj.in_features == 80 * 8
    assert count_parameters(model)["encoder"] == count_parameters(build_model(load_config(None).model))["encoder"]
    assert isinstance(build_model(load_config(None).model), NestModel)  # NEST stays the default


@pytest.mark.parametrize("overrides,key", [
    (["model.objective=bert"], "model.objective"),
    (["model.w2vbert.reduce=max"], "model.w2vbert.reduce"),
    (["model.w2vbert.quantized_targets=false"], "model.w2vbert.mlm"),
    (["model.w2vbert.decoder_out=30", "model.w2vbert.num_groups=4"], "model.w2vbert.decoder_out"),
    (["model.w2vbert.quantizer_temp_min=3.0"], "model.w2vbert.quantizer_temp"),
    (["model.w2vbert.num_negatve=3"], "model.w2vbert.num_negatives"),
])
def test_bad_w2vbert_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs" / "w2vbert_tiny.yaml", overrides)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = W2vBertModel(tiny_config()).eval()
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert isinstance(loaded, W2vBertModel) and loaded.cfg == model.cfg
    audio, lens = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 11000])
    with torch.no_grad():
        a = model(audio, lens, audio, lens)
        b = loaded(audio, lens, audio, lens, frame_mask=a.frame_mask, freq_mask=a.freq_mask)
    assert torch.equal(a.target_ids, b.target_ids) and torch.equal(a.decoder_out, b.decoder_out)
    assert torch.equal(a.mlm_loss, b.mlm_loss)
    assert torch.equal(model.encode(audio, lens)[0], loaded.encode(audio, lens)[0])
    with torch.no_grad():
        assert torch.equal(model.encode(audio, lens)[0], load_pretrained_encoder(tmp_path / "m.pt").eval()(audio, lens)[0])


def test_checkpoints_without_objective_are_nest(tmp_path):
    nest = NestModel(tiny_config())
    cfg = asdict(nest.cfg)
    del cfg["objective"], cfg["w2vbert"]  # as written before the w2vbert objective existed
    torch.save({"model_config": cfg, "state_dict": nest.state_dict()}, tmp_path / "old.pt")
    assert isinstance(load_model(tmp_path / "old.pt"), NestModel)


def nemo_members():
    with tarfile.open(NEMO) as tar:
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)
    return cfg, state


def write_nemo(path, cfg, state):
    with tarfile.open(path, "w") as tar:
        for name, data in (("model_config.yaml", yaml.safe_dump(cfg).encode()), ("model_weights.ckpt", None)):
            if data is None:
                buf = io.BytesIO()
                torch.save(state, buf)
                data = buf.getvalue()
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@needs_nemo
def test_nemo_w2vbert_encoder_serves_extraction():
    cfg, state = load_nemo(NEMO)
    assert cfg.objective == "w2vbert" and not any(k.startswith("decoder_losses") for k in state)
    model = load_model(NEMO)
    encoder = load_pretrained_encoder(NEMO).eval()
    audio, lens = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000])
    with torch.no_grad():
        encoded, encoded_lens = encoder(audio, lens)
    assert encoded.shape == (2, 64, 14) and encoded_lens.tolist() == [13, 10]  # 112 frames after pad_to
    assert torch.equal(encoded, model.encode(audio, lens)[0])


@needs_nemo
@pytest.mark.parametrize("path,value", [
    ("loss_list.contrastive.loss.sample_from_non_masked", True),
    ("loss_list.contrastive.loss.combine_time_steps", 4),
    ("loss_list.contrastive.decoder.stride_layers", 1),
    ("loss_list.mlm.targets_from_loss", None),
    ("loss_list.mlm.decoder.num_classes", 300),
    ("loss_list.mlm.output_from_layer", "layers.0"),
    ("spec_augment._target_", "nemo.collections.asr.modules.SpectrogramAugmentation"),
    ("dropout_features", 0.1),
])
def test_nemo_unsupported_options_are_refused_by_name(tmp_path, path, value):
    cfg, state = nemo_members()
    *parents, leaf = path.split(".")
    section = cfg
    for p in parents:
        section = section[p]
    section[leaf] = value
    nemo = write_nemo(tmp_path / "bad.nemo", cfg, state)
    with pytest.raises(CheckpointError, match=rf"bad\.nemo.*{leaf}"):
        load_model(nemo)


@needs_nemo
def test_nemo_linear_targets_as_nemo_ships_its_yaml(tmp_path):
    """quantized_targets: false and MLM off, NeMo's fast-conformer.yaml as shipped: loads, target_proj named."""
    cfg, state = nemo_members()
    cfg = copy.deepcopy(cfg)
    cfg["loss_list"]["contrastive"]["loss"]["quantized_targets"] = False
    cfg["loss_list"]["mlm"]["is_active"] = False
    state = {k: v for k, v in state.items() if ".quantizer." not in k and not k.startswith("decoder_losses.mlm")}
    state["decoder_losses.contrastive.loss.target_proj.weight"] = torch.randn(32, 640)
    state["decoder_losses.contrastive.loss.target_proj.bias"] = torch.randn(32)
    model = load_model(write_nemo(tmp_path / "w2v2.nemo", cfg, state))
    assert not model.cfg.w2vbert.quantized_targets and not model.cfg.w2vbert.mlm
    assert torch.equal(model.target_proj.bias, state["decoder_losses.contrastive.loss.target_proj.bias"])
