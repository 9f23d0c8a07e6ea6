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

import yaml
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
    """Reject keys that the dataclass ``schema`` does not have, suggesting the closest ones, and values that do not
    fit the shape of their key: a section (``trainer``) given one value, a list key given a mapping. (Values of
    the wrong scalar type are OmegaConf's to find, naming the key.)"""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in list(raw.items()):
        full = f"{prefix}{key}"
        if key not in hints:
            candidates = [f"{prefix}{name}" for name in hints]
            close = difflib.get_close_matches(str(full), candidates, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(candidates)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if value is None:  # a YAML section whose keys are all commented out
                del raw[key]
            elif not isinstance(value, dict):
                first = next(iter(typing.get_type_hints(hint)))
                raise ConfigError(f"config key {full!r} is a section, not a value (given {value!r}): set its keys, "
                                  f"e.g. {full}.{first}=... (`--help` lists them)")
            else:
                _check_keys(value, hint, f"{full}.")
        elif _is_list(hint):
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, (list, dict)) for v in items):
                raise ConfigError(f"config key {full!r} takes a list of values ([a, b]) or one value (given {value!r})")
        elif isinstance(value, (list, dict)):
            raise ConfigError(f"config key {full!r} takes one value (given {value!r})")


def _is_list(hint: Any) -> bool:
    """``List[X]`` or ``Optional[List[X]]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union else []
    return typing.get_origin(hint) in (list, List) or (len(args) == 1 and typing.get_origin(args[0]) in (list, List))


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
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError, IndexError, ValueError) as e:
            raise ConfigError(f"override {item!r} cannot be read ({_first_line(e)}): give key=value, e.g. "
                              f"trainer.max_steps=1000 or data.train_cuts=[a.jsonl.gz,b.jsonl.gz]") from None
    return OmegaConf.from_dotlist(list(overrides))


def find_config_file(path: str | Path) -> Path:
    """``path`` as given, else the same name in this repository (so `--config configs/x.yaml` works anywhere)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder: give a YAML file (e.g. configs/nest_tiny.yaml)")
    for candidate in (REPO / path, REPO / "configs" / path.name, REPO / "configs" / f"{path.name}.yaml"):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
    raise ConfigError(f"config file {str(path)!r} does not exist (the repository's configs: {available})")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Merge defaults, an optional YAML file and ``key=value`` overrides into a checked RunConfig."""
    layers = []
    if path is not None:
        layers.append(read_config_file(find_config_file(path)))
    try:
        cli = parse_overrides(overrides)
        layers.append(cli)
        raw = OmegaConf.merge(*layers) if layers else OmegaConf.create()
        raw_dict = OmegaConf.to_container(raw, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the configuration: {_first_line(e)}") from None
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
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f"for config key {key!r}" if key else "in the configuration"
        raise ConfigError(f"bad value {where}: {_first_line(e)} (`--help` lists every key with its default)") from None
    validate(cfg)
    return cfg


def read_config_file(path: Path) -> DictConfig:
    """A YAML config file as a mapping of sections; a file that is not one is a ConfigError saying where and why."""
    try:
        loaded = OmegaConf.load(path)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file: give a YAML file (e.g. configs/nest_tiny.yaml)") \
            from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or _first_line(e)
        raise ConfigError(f"config file {path} is not valid YAML{where} ({problem}): the keys of a section are "
                          f"indented alike, one `key: value` a line") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None
    except OmegaConfBaseException as e:  # YAML that OmegaConf cannot hold, e.g. a key that is not a name
        raise ConfigError(f"config file {path} is not a configuration ({_first_line(e)}): one `key: value` a line, "
                          f"under the sections data:, model:, optim:, trainer:") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} holds a YAML list, not a mapping of sections (data:, model:, optim:, "
                          f"trainer:)")
    return loaded


def _first_line(e: BaseException) -> str:
    """The message of an OmegaConf or YAML error without the lines of context it appends."""
    text = getattr(e, "msg", None) or str(e)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(e).__name__


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
