"""``train.py --help``: every section and key with its default and its one-line meaning."""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import yaml

from nest.config.schema import RunConfig


def field_help(schema: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field of a config dataclass: the one line train.py --help shows."""
    out = {}
    for cls in reversed(schema.__mro__[:-1]):
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def describe(obj: Any = None, indent: str = "") -> str:
    """Every section and key with its default and meaning, for ``train.py --help``."""
    obj = RunConfig() if obj is None else obj
    helps = field_help(type(obj))
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:  # {(type(value).__doc__ or '').strip().splitlines()[0]}")
            lines.append(describe(value, indent + "  "))
        else:
            shown = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
            lines.append(f"{indent}{f.name}: {shown}  # {helps.get(f.name, '')}".rstrip())
    return "\n".join(lines)
