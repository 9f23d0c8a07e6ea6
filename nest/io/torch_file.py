"""Torch files read as data: tensors and plain containers only, never pickled code."""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from nest.errors import CheckpointError

# How torch.save's legacy (pre-1.6, non-zip) format begins: its magic number, pickled with protocol 2.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def safe_torch_load(source: Any, name: str, mmap: bool = False) -> Any:
    """torch.load restricted to tensors and plain containers; a pickled object is refused, not run. A file that is
    not a torch file at all (empty, cut short, another format) is a CheckpointError saying so. ``mmap`` maps the
    tensors of a file instead of reading them (a cheap check that the whole file loads)."""
    problem = torch_file_problem(source)
    if problem:
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint: {problem}")
    if mmap and isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            mmap = f.read(len(_LEGACY_MAGIC)) != _LEGACY_MAGIC  # torch maps only its zip format
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:  # the unpickler met bytes that are no pickle instruction: damage, not code
            raise CheckpointError(f"{name}: not a readable PyTorch checkpoint: damaged (its pickled part does not "
                                  f"read back)") from None
        raise CheckpointError(
            f"{name}: refusing to load, the file holds pickled Python objects beyond tensors and plain "
            f"containers ({found.group(1)}), and loading it would run code. Re-save its state_dict "
            f"with torch.save(model.state_dict(), path) from a trusted environment."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:  # a damaged archive
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint: damaged ({first})") from None


def torch_file_problem(source: Any) -> Optional[str]:
    """Why ``source`` (a path or a binary file object) cannot be a file of torch.save, or None when its layout is
    whole: a zip archive with its central directory (torch's format; a file cut short loses it), or the legacy
    format's header."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return "it is a folder"
        size = path.stat().st_size
        if size == 0:
            return "the file is empty (a copy or a save that did not finish)"
        with open(path, "rb") as f:
            return _layout_problem(f, size)
    if isinstance(source, io.IOBase) and source.seekable():
        start = source.tell()
        size = source.seek(0, io.SEEK_END) - start
        source.seek(start)
        return _layout_problem(source, size) if size else "the file is empty"
    return None


def _layout_problem(f, size: int) -> Optional[str]:
    start = f.tell()
    head = f.read(len(_LEGACY_MAGIC))
    f.seek(start)
    if head == _LEGACY_MAGIC:
        return None
    if head[:4] != b"PK\x03\x04":
        return (f"its {size} bytes are not in torch.save's format (it is another kind of file, or damaged); give a "
                f".ckpt written by nest-train or a NeMo .nemo file")
    try:
        with zipfile.ZipFile(f) as z:
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
                return "a zip archive without torch's data.pkl: not a file of torch.save"
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"the file is cut short or damaged ({e}); it was not written to the end"
    finally:
        f.seek(start)
    return None
