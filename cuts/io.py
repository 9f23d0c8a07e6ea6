"""Files of the data path: atomic writes, a lazy JSON-lines reader, and a bounded-memory external shuffle.

Everything ``prepare.py`` writes goes through :func:`atomic_write`, so an interrupted run leaves the
previous file (or none), never half of one. :func:`iter_jsonl` reads CutSet and NeMo manifests line
by line and names a bad line by ``file:line``. :class:`ExternalShuffle` puts any number of lines in a
seeded random order with a fixed memory budget (the way ``sort`` does an external sort).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, IO, Iterator, Optional, Union

import yaml

GZIP_MAGIC = b"\x1f\x8b"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ManifestError(ValueError):
    """A manifest line that is not a JSON object, named by ``file:line``."""


@contextlib.contextmanager
def atomic_write(path: Union[str, Path], binary: bool = False, tmp_dir: Optional[Path] = None) -> Iterator[IO]:
    """Open ``path`` for writing through a temporary file in the same folder (or in ``tmp_dir``, which must be on
    the same file system); on success the data is flushed, fsynced and renamed over ``path``, on an exception the
    temporary file is removed. A name ending in ``.gz`` is gzip-compressed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; give it the permissions open() would
    raw = os.fdopen(fd, "wb")
    gz = gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) \
        if path.name.endswith(".gz") else None
    inner = gz or raw
    handle = inner if binary else io.TextIOWrapper(inner, encoding="utf-8", newline="\n")
    try:
        yield handle
        if handle is not inner:
            handle.flush()
            handle.detach()
        if gz is not None:
            gz.close()  # writes the gzip trailer; ``raw`` stays open
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(Exception):
            handle.close()
        raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    """The rename reaches the disk with the folder's entry (not possible on every file system)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: Union[str, Path], text: str, tmp_dir: Optional[Path] = None) -> None:
    """``path.write_text(text)``, atomically."""
    with atomic_write(path, tmp_dir=tmp_dir) as f:
        f.write(text)


@contextlib.contextmanager
def _open_lines(source: Union[str, Path]) -> Iterator[IO[bytes]]:
    """A binary stream of a local file or any URL lhotse's I/O reads, gzip-decompressed when it starts
    with gzip's magic bytes (lhotse decompresses local ``.gz`` files itself; URLs may arrive compressed)."""
    from lhotse.serialization import open_best

    with open_best(str(source), "rb") as f:
        raw = f if hasattr(f, "peek") else io.BufferedReader(_Reader(f))
        yield gzip.open(raw, "rb") if raw.peek(2)[:2] == GZIP_MAGIC else raw


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


def iter_jsonl(path: Union[str, Path], on_error: Optional[Callable[[str, str], None]] = None
               ) -> Iterator[tuple[str, dict]]:
    """``(where, object)`` per non-empty line of a JSON-lines file (plain or gzip, local or a URL), read
    lazily; ``where`` is ``file:line``. A line that is not a JSON object goes to ``on_error(where, message)``
    and is skipped; without ``on_error`` it raises :class:`ManifestError`. A gzip file cut short is a
    :class:`ManifestError` naming the last line read."""
    n = 0
    try:
        with _open_lines(path) as f:
            # Binary lines split at b"\n" only (text mode would also split at U+2028 and others).
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError:
                    obj, problem = None, "not UTF-8 text"
                except json.JSONDecodeError as e:
                    obj, problem = None, f"not valid JSON ({e.msg}: column {e.colno})"
                else:
                    problem = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
                if problem is None:
                    yield where, obj
                elif on_error is None:
                    raise ManifestError(f"{where}: {problem}; fix or delete that line")
                else:
                    on_error(where, problem)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ManifestError(f"{path}: unreadable after line {n} ({type(e).__name__}: {e}); "
                            "the file is damaged or was cut short: write it again") from None


def read_yaml(path: Union[str, Path], what: str, made_by: str) -> Any:
    """The YAML document in ``path``; a file that is missing, not text or not YAML raises one line naming it (and
    the line of a YAML error) and ``made_by``, the command that writes such a file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist; make it with {made_by}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder; give the YAML file {made_by} writes") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a text file; give the YAML file {made_by} writes") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{what} {path}{f':{mark.line + 1}' if mark else ''} is not valid YAML ({problem}); "
                         f"fix it or make it again with {made_by}") from None


def cut_short(path: Union[str, Path]) -> Optional[str]:
    """Why the local JSON-lines file ``path`` ends early, in the words of :func:`iter_jsonl`'s error, or None: a
    gzip stream that does not decompress to its end (read whole, without parsing), or a plain file whose last line
    breaks off (no newline and no JSON)."""
    with open(path, "rb") as raw:
        if raw.read(2) != GZIP_MAGIC:
            size = raw.seek(0, os.SEEK_END)
            raw.seek(max(0, size - (1 << 20)))
            tail = raw.read()
            last = tail.rsplit(b"\n", 1)[-1]
            try:
                json.loads(last) if last.strip() else None
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                return f"{path}: its last line breaks off ({last[:40]!r}...); the file was cut short: write it again"
            return None
        raw.seek(0)
        try:
            with gzip.open(raw, "rb") as f:
                for _ in iter(lambda: f.read(1 << 20), b""):
                    pass
        except (EOFError, gzip.BadGzipFile, zlib.error):
            try:  # read again line by line (slower), only to name the line where it breaks
                for _ in iter_jsonl(path, on_error=lambda where, problem: None):
                    pass
            except ManifestError as e:
                return str(e)
            return f"{path}: unreadable (the file is damaged or was cut short): write it again"
    return None


def sha256_file(path: Union[str, Path]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def key_hash(key: str, seed: int) -> int:
    """A 64-bit hash of ``key`` that depends on ``seed`` only (not on Python's hash randomization)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


class ExternalShuffle:
    """Lines spread over temporary shards by a seeded hash of their key, read back shard by shard.

    Memory stays at ``buffer_bytes`` while adding, and one shard (1/``num_shards`` of the lines: about
    40 MB of 100-byte lines at 100 M lines) while reading. Lines with the same key land in the same shard, in the order they were added, so the
    reader can find repeated keys one shard at a time. Shuffling each shard with :meth:`rng` and
    concatenating the shards gives a seeded random order of all lines.
    """

    def __init__(self, tmp_dir: Union[str, Path], seed: int, num_shards: int = 256, buffer_bytes: int = 32 << 20):
        self.dir = Path(tmp_dir)
        shutil.rmtree(self.dir, ignore_errors=True)  # left over by an interrupted run
        self.dir.mkdir(parents=True)
        self.seed = seed
        self.num_shards = num_shards
        self.buffer_bytes = buffer_bytes
        self.buffers: list[list[str]] = [[] for _ in range(num_shards)]
        self.buffered = 0
        self.count = 0

    def add(self, key: str, line: str) -> None:
        """Add one line (without its newline)."""
        self.buffers[key_hash(key, self.seed) % self.num_shards].append(line)
        self.buffered += len(line) + 1
        self.count += 1
        if self.buffered >= self.buffer_bytes:
            self._flush()

    def _flush(self) -> None:
        # Each flush appends one gzip member per shard; gzip reads concatenated members as one stream.
        for i, buf in enumerate(self.buffers):
            if buf:
                with open(self.dir / f"{i:04d}.gz", "ab") as f:
                    f.write(gzip.compress(("\n".join(buf) + "\n").encode(), compresslevel=1))
                buf.clear()
        self.buffered = 0

    def rng(self, shard: int) -> random.Random:
        """The random generator of one shard, derived from the seed."""
        return random.Random(self.seed * 1_000_003 + shard)

    def shards(self) -> Iterator[tuple[int, list[str]]]:
        """``(index, lines in the order added)`` per non-empty shard; removes the temporary files."""
        self._flush()
        try:
            for i in range(self.num_shards):
                path = self.dir / f"{i:04d}.gz"
                if path.is_file():
                    with gzip.open(path, "rt", encoding="utf-8") as f:
                        lines = f.read().split("\n")[:-1]  # not splitlines(): it also splits at U+2028 and others
                    path.unlink()
                    yield i, lines
        finally:
            self.cleanup()

    def shuffled(self) -> Iterator[str]:
        """All lines in a seeded random order."""
        for i, lines in self.shards():
            self.rng(i).shuffle(lines)
            yield from lines

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
