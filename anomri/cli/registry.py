"""The registry of subcommand handlers, filled by the domain modules of :mod:`anomri.cli`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

#: A handler returns None, or its exit status when it has its own (``anomri bids``).
Handler = Callable[[argparse.Namespace], int | None]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register the handler of subcommand ``name``."""

    def decorator(func: Handler) -> Handler:
        COMMANDS[name] = func
        return func

    return decorator



def report_error(message: object, log: str | None = None) -> None:
    """The one line a user reads on bad input, ``anomri: error: <file>: <problem>``, on stderr and in ``log``."""
    line = f"anomri: error: {message}\n"
    sys.stderr.write(line)
    if log:
        with open(log, "a") as fh:
            fh.write(line)
