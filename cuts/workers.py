"""Worker processes that end with their command, and a SIGTERM that unwinds the command like an error.

A killed ``prepare --jobs N`` once left its workers (about 300 MB each) waiting forever on their task queue, which
every worker holds open, and its temporary files behind. Here each worker watches its parent and exits when the
parent is gone (SIGKILL included); SIGTERM and SIGINT reach the main process as an exception, so ``with`` blocks
remove their temporary files, pending tasks are cancelled and the workers are told to stop. Both signals wait while
workers are forked: an exception raised by a handler inside fork's hooks (logging's lock release runs there) is
printed and dropped by Python, and the command would go on as if nothing had been asked.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Optional

PARENT_POLL_S = 0.5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_held: Optional[list[int]] = None  # while workers are forked (signals_held): the stop signals that arrived


class Terminated(Exception):
    """The process received SIGTERM."""

    exit_code = 128 + signal.SIGTERM


def _exit_with_parent(ppid: int) -> None:
    while os.getppid() == ppid:  # a process whose parent died is given another one
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _start_worker(initializer: Optional[Callable], initargs: tuple) -> None:
    # The main process handles both signals (a terminal's Ctrl-C reaches the workers too) and stops the workers.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Inside :func:`sigterm_raises`, the first SIGTERM and the first SIGINT that arrive in the block are raised as it
    ends (a second SIGTERM still ends the process at once); elsewhere the block runs as is."""
    global _held
    if _held is not None or signal.getsignal(signal.SIGTERM) is not _stop:
        yield
        return
    _held = held = []
    try:
        yield
    finally:
        _held = None
        if held:
            signal.raise_signal(signal.SIGTERM if signal.SIGTERM in held else held[0])


class _Pool(ProcessPoolExecutor):
    def submit(self, fn, /, *args, **kwargs):
        with signals_held():  # the workers (and the thread that may start more) are started inside submit
            return super().submit(fn, *args, **kwargs)


@contextlib.contextmanager
def process_pool(jobs: int, initializer: Optional[Callable] = None, initargs: tuple = ()
                 ) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor of ``jobs`` workers that exit with this process; when the block fails (or is
    interrupted), tasks not started are cancelled and only the running ones are waited for."""
    pool = _Pool(jobs, initializer=_start_worker, initargs=(initializer, initargs))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _stop(signum, frame) -> None:
    """SIGTERM raises :class:`Terminated` and goes back to its default (a second one ends the process at once);
    SIGINT raises KeyboardInterrupt. In :func:`signals_held` the first of each is kept for the block's end."""
    held = _held
    if held is not None and signum not in held:
        held.append(signum)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    if held is not None:  # the second SIGTERM while workers are forked: the first one waits, this one may not
        signal.raise_signal(signum)
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """In the block, SIGTERM raises :class:`Terminated` and SIGINT KeyboardInterrupt, in the main thread (elsewhere
    the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
