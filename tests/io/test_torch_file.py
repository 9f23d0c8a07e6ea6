"""Any file given as a checkpoint loads as data or is one CheckpointError that says what is wrong with it: empty,
cut short, damaged, another format, or pickled code (only the last is called code)."""
import io
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nest.errors import CheckpointError
from nest.io.torch_file import safe_torch_load, torch_file_problem


class Foo:  # a pickled object that only code could rebuild
    pass


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}, "hyper_parameters": {"a": [1, 2]}}, path)
    return path.read_bytes()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000))
def test_random_bytes_are_not_called_code(tmp_path, data):
    path = tmp_path / "x.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"x.ckpt: not a readable PyTorch checkpoint") as e:
        safe_torch_load(path, str(path))
    assert "run code" not in str(e.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 0.9999))
def test_a_checkpoint_cut_short_anywhere_says_so(tmp_path, good, fraction):
    path = tmp_path / "last.ckpt"
    path.write_bytes(good[: int(fraction * len(good))])
    with pytest.raises(CheckpointError, match=r"last.ckpt: not a readable PyTorch checkpoint: the file is (empty|cut short)"):
        safe_torch_load(path, str(path))
    assert torch_file_problem(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_damaged_bytes_inside_a_checkpoint_load_or_say_why(tmp_path, good, seed):
    rng = random.Random(seed)
    data = bytearray(good)
    for _ in range(3):
        data[rng.randrange(len(data) - 100)] = rng.randrange(256)  # the central directory (its end) stays whole
    path = tmp_path / "x.ckpt"
    path.write_bytes(bytes(data))
    try:
        safe_torch_load(path, str(path))
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)


def test_pickled_objects_are_refused_as_code_and_named(tmp_path, good):
    path = tmp_path / "obj.ckpt"
    torch.save({"a": Foo()}, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects .*\(.*Foo\).*would run code"):
        safe_torch_load(path, str(path))
    assert safe_torch_load(io.BytesIO(good), "in memory")["hyper_parameters"] == {"a": [1, 2]}
    assert torch_file_problem(tmp_path) == "it is a folder"


def test_legacy_format_loads_memory_mapped_or_not(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch_file_problem(path) is None
    assert safe_torch_load(path, str(path), mmap=True)["w"].sum() == 3
