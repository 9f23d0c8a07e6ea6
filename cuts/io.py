"""One atomic writer for every file this project writes."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside ``path``, flush it to disk, then rename it over ``path``: readers and a
    crash never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk with the folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(source: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object or the Exception that parsing raised) for each non-empty line of a JSON-lines
    file: local, gzip-compressed or any URL lhotse's I/O reads. A malformed line is the caller's to report."""
    from lhotse.serialization import open_best

    with open_best(str(source), "rb") as f:
        # lhotse's I/O decompresses local .gz files itself; URLs and pipes may arrive compressed.
        raw = f if hasattr(f, "peek") else io.BufferedReader(_Reader(f))
        stream = gzip.open(raw, "rb") if raw.peek(2)[:2] == b"\x1f\x8b" else raw
        for n, line in enumerate(stream, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except ValueError as e:
                    yield n, e


class _Reader(io.RawIOBase):
    """A file-like object with only ``read`` (lhotse's pipes) as a raw stream, so that it can be buffered."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)
