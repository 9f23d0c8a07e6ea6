"""One command at a time per output folder, its temporary files in a folder of its own, and what a killed run left
removed by the next one.

Two prepares into one folder once shared their temporary files: one exited 0 with a fifth of its cuts. A command
that writes a folder now holds ``FOLDER/.lock`` (``flock``: the kernel lets go when the process ends, SIGKILL
included) for its whole run; a second one refuses at once and names the first (pid, command and start time are
written into the lock). Each run keeps its temporary files in ``FOLDER/.run-*``, so whoever takes the lock knows
that any such folder is left from a run that died, and removes it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Union

log = logging.getLogger(__name__)
LOCK = ".lock"
RUN_PREFIX = ".run-"
LEGACY_TMP = (".shuffle.tmp",)  # the fixed temporary folder of earlier versions
_held: dict[str, int] = {}  # folders this process holds, with how many nested holders


class FolderBusy(RuntimeError):
    """Another process is writing the output folder."""


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    out = []
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def _remove_leftovers(folder: Path, stale: list[Path]) -> None:
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log.info("%s: removed the temporary files of an interrupted run (%s)", folder, ", ".join(p.name for p in stale))


@contextlib.contextmanager
def _hold(lock_file: Path, what: Path) -> Iterator[None]:
    """Hold ``lock_file``'s flock, with this process named in it; refuse at once, naming the holder."""
    handle = open(lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise FolderBusy(f"{what} is being written by {owner}: wait for it to finish, or give another output folder") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} (`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`, "
                     f"since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the flock


@contextlib.contextmanager
def folder_lock(folder: Union[str, Path]) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (creating the folder) and give a new temporary folder inside it,
    removed at the end. Nested holds in one process share the lock. When the block fails, a folder it created
    is removed again if nothing but the lock is in it (a failed prepare leaves no empty output folder)."""
    folder = Path(os.path.abspath(folder))
    created = _missing_parents(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder)
    with contextlib.ExitStack() as stack:
        outermost = key not in _held
        if outermost:
            stack.enter_context(_hold(folder / LOCK, folder))
            _remove_leftovers(folder, [p for p in folder.iterdir() if p.name.startswith(RUN_PREFIX) or p.name in LEGACY_TMP])
            stack.callback(_held.pop, key)
        _held[key] = _held.get(key, 0) + 1
        tmp = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=folder))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        try:
            yield tmp
        except BaseException:
            if outermost and created and {p.name for p in folder.iterdir()} <= {LOCK, tmp.name}:
                shutil.rmtree(folder, ignore_errors=True)
                for parent in created[1:]:
                    with contextlib.suppress(OSError):
                        parent.rmdir()  # only when empty
            raise
        finally:
            _held[key] -= 1


@contextlib.contextmanager
def replace_lock(path: Union[str, Path]) -> Iterator[Path]:
    """For an output that is replaced as a whole (a Shar folder): hold ``PARENT/.NAME.lock`` and give a new temporary
    folder beside it (``.NAME.run-*``) to build in; what a run that died left there is removed first."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _hold(path.parent / f".{path.name}{LOCK}", path):
        legacy = {f".{path.name}.{x}" for x in ("tmp", "shuffle.tmp", "old")}  # the fixed names of earlier versions
        _remove_leftovers(path.parent, [p for p in path.parent.iterdir()
                                        if p.name.startswith(f".{path.name}{RUN_PREFIX}") or p.name in legacy])
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{RUN_PREFIX}", dir=path.parent))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
