"""Loading a RunConfig: defaults, a YAML file and ``key=value`` overrides merged and checked.

Unknown keys and wrong types fail at start-up with the key named and the closest valid keys suggested, never
an hour into a run.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from pathlib import Path
from typing import Any, List, Optional, Sequence

from lhotse import CutSet
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cuts.sampler import open_cuts
from cuts.shar import is_shar
from nest.config.checks import validate
from nest.config.schema import RunConfig
from nest.errors import CheckpointError, ConfigError
from nest.io.checkpoint import read_model_config
from nest.objectives.config import ModelConfig, model_preset

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]  # configs/ lives beside the packages
PRESET_WEIGHT_DECAY = {"small": 0.0}  # optim.weight_decay of NeMo's size table, where it differs


def _check_keys(raw: Any, schema: type, prefix: str) -> None:
    """Reject keys that the dataclass ``schema`` does not have, suggesting the closest ones."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in hints:
            candidates = [f"{prefix}{name}" for name in hints]
            close = difflib.get_close_matches(full, candidates, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(candidates)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(value, hints[key], f"{full}.")


def _wrap_single_values(raw: Any, schema: type) -> None:
    """``data.train_cuts=a.jsonl.gz`` means ``[a.jsonl.gz]``: one value given for a list key becomes a list."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            _wrap_single_values(value, hint)
        elif typing.get_origin(hint) in (list, List) and value is not None and not isinstance(value, list):
            raw[key] = [value]


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings as a nested config; values are parsed as YAML (numbers, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    return OmegaConf.from_dotlist(list(overrides))


def find_config_file(path: str | Path) -> Path:
    """``path`` as given, else the same name in this repository (so `--config configs/x.yaml` works anywhere)."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (REPO / path, REPO / "configs" / path.name, REPO / "configs" / f"{path.name}.yaml"):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
    raise ConfigError(f"config file {str(path)!r} does not exist (the repository's configs: {available})")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Merge defaults, an optional YAML file and ``key=value`` overrides into a checked RunConfig."""
    layers = []
    if path is not None:
        layers.append(OmegaConf.load(find_config_file(path)))
    cli = parse_overrides(overrides)
    layers.append(cli)
    try:
        raw = OmegaConf.merge(*layers) if layers else OmegaConf.create()
        raw_dict = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read the configuration: {e}") from None
    _check_keys(raw_dict, RunConfig, "")
    _wrap_single_values(raw_dict, RunConfig)
    base = RunConfig()
    if raw_dict.get("init_model_config"):
        raw_dict["model"] = _model_from_checkpoint(base, raw_dict, OmegaConf.to_container(cli).get("model") or {})
    preset = (raw_dict.get("model") or {}).get("preset")
    if preset is not None:
        base.model = model_preset(preset)
        if preset in PRESET_WEIGHT_DECAY:
            base.optim.weight_decay = PRESET_WEIGHT_DECAY[preset]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.create(raw_dict))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad value for config key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    cfg: RunConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _model_from_checkpoint(base: RunConfig, raw: dict, cli_model: dict) -> dict:
    """``init_model_config=true``: the model section of ``init_from``'s checkpoint, then the model.* keys given
    on the command line; model.* keys of the YAML file are dropped (with a note)."""
    source = raw.get("init_from")
    if not source:
        raise ConfigError("init_model_config=true needs init_from=PATH (our checkpoint or a NeMo .nemo file)")
    try:
        model = dataclasses.asdict(read_model_config(source))
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"init_from: {e}") from None
    dropped = sorted(set(raw.get("model") or {}) - set(cli_model))
    if dropped:
        log.info("init_model_config=true: model settings of the YAML file (%s) are replaced by %s's",
                 ", ".join(dropped), source)
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(model), OmegaConf.create(cli_model)))


def to_yaml(cfg: RunConfig) -> str:
    """The resolved configuration as YAML, as written into the experiment folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_model_config(path: str | Path) -> ModelConfig:
    """The model section of the config file ``path`` (defaults for what it leaves out), checked."""
    return load_config(path).model


def open_manifest(path: str | Path, option: str, error: type[Exception] = ConfigError,
                  refuse_shar: Optional[str] = None) -> CutSet:
    """The lazy CutSet a command was given as ``option``; a missing file (or, with ``refuse_shar``, a Shar folder:
    the hint says what to give instead) is an ``error`` naming the option."""
    path = str(path)
    if refuse_shar and is_shar(path):
        raise error(f"{option} {path} is a Shar folder: {refuse_shar}")
    try:
        return open_cuts(path, seed=0)
    except FileNotFoundError:
        kinds = "a CutSet manifest (cuts.jsonl.gz of nest-prepare)" + ("" if refuse_shar else " or a Shar folder")
        raise error(f"{option} {path}: no such file; give {kinds}") from None
