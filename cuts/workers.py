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
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


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
    """SIGTERM and SIGINT that arrive in the block are handled as the block ends (in the main thread; elsewhere
    the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
        if arrived:
            signal.raise_signal(arrived[0])  # handled now, by the handler the block found


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


def _raise_terminated(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """In the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
