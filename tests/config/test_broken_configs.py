"""Any configuration a user can write loads or fails with one ConfigError naming the key or the file: never
another exception (a raw traceback)."""
import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nest.config import RunConfig, load_config
from nest.errors import ConfigError
from tests.conftest import ROOT


def _paths(schema: type, prefix: str = "") -> list[str]:
    out = []
    for name, hint in typing.get_type_hints(schema).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            out += _paths(hint, f"{prefix}{name}.")
    return out


KEYS = _paths(RunConfig)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "cpu", "ddp", "small", "kmeans", "1e-3", "[1,2]"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                                   max_size=3), max_leaves=6)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=10))


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = value
    return out


def _loads_or_says_why(*args) -> None:
    try:
        load_config(*args)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message and "key '?'" not in message, message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flat=st.dictionaries(keys, values, max_size=4))
def test_any_yaml_mapping_loads_or_names_the_key(tmp_path, flat):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_nest(flat)))
    _loads_or_says_why(path)


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.tuples(keys, st.text(max_size=12)), max_size=3))
def test_any_override_loads_or_names_the_key(items):
    _loads_or_says_why(None, [f"{k}={v}" for k, v in items])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_given_as_config_loads_or_says_why(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    _loads_or_says_why(path)


@pytest.mark.parametrize("text, expected", [
    ("data:\n  batch_duration: 40\n   num_buckets: 3\n", r"not valid YAML at line 3, column 15"),
    ("- a\n- b\n", r"holds a YAML list, not a mapping of sections"),
    ("data: [\n", r"not valid YAML at line 2"),
])
def test_malformed_yaml_names_file_and_line(tmp_path, text, expected):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(path)
    assert "mine.yaml" in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("trainer=5", r"config key 'trainer' is a section, not a value \(given 5\): set its keys, e.g. trainer\."),
    ("model.encoder=3", r"'model.encoder' is a section"),
    ("data.train_cuts={}", r"'data.train_cuts' takes a list"),
    ("exp_dir=[a,b]", r"'exp_dir' takes one value"),
    ("[=1", r"override '\[=1' cannot be read"),
])
def test_a_value_of_the_wrong_shape_names_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_a_section_left_empty_in_yaml_keeps_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n#  max_steps: 3\ndata:\n  batch_duration: 40\n")
    cfg = load_config(path)
    assert cfg.trainer.max_steps == RunConfig().trainer.max_steps and cfg.data.batch_duration == 40


def test_cli_prints_one_line_for_malformed_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  batch_duration: 40\n   num_buckets: 3\n")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "c.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: config file c.yaml is not valid YAML at line 3, column 15 (mapping values are not allowed in this "
        "context): the keys of a section are indented alike, one `key: value` a line"]
