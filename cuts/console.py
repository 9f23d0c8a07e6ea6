"""What every command prints: errors as one line, our log lines above other libraries', ``--help`` with defaults."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence


def one_line(message: object) -> str:
    """``message`` as one line of printable text: a character that is not printable (a line or record separator
    from a user's file, a control code) is written as its escape, so that an error stays one line."""
    text = str(message).strip()
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def error_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, for one file's failure in a log or a list. lhotse's AudioLoadingError
    ("... failed. Details:" then one line per backend) gives its first backend's reason, which says why."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    backend = next((line.split("): ", 1)[-1] for line in lines[1:] if line.startswith("Exception #")), None)
    if backend and first.endswith("Details:"):
        first = f"{first.removesuffix(' Details:').rstrip('.')}: {backend}"
    return one_line(f"{type(e).__name__}: {first}".rstrip(": "))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A command's ``--help``: descriptions as written, each option with its default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def configure_logging(fmt: str = "%(levelname)s %(name)s: %(message)s",
                      ours: Sequence[str] = ("nest", "cuts")) -> None:
    """A command's log: our lines (and ``ours``) from INFO, other libraries' from WARNING: lhotse logs its audio
    backends at INFO on the root logger ("Using audioread ..."), matplotlib its units."""
    logging.basicConfig(level=logging.WARNING, format=fmt)
    for name in ours:
        logging.getLogger(name).setLevel(logging.INFO)
