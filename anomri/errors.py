"""Errors that the command line reports as one clear line."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: names the offending file and what is wrong with it.

    Parameters
    ----------
    path : str or Path
        The file (or directory) at fault.
    problem : str
        What is wrong, phrased for the user.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
