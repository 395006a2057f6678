"""kiln's error types: what the command line turns into one line and an exit code.

``kiln.cli.main`` catches :class:`KilnError` once: it prints ``kiln <command>: <message>``
(the message says what is wrong and what to do) and exits with :attr:`KilnError.exit_code`,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class KilnError(Exception):
    """Base of every error that ends a command with one line."""

    exit_code = 1


class UserError(KilnError):
    """Something the user asked for or set up is wrong; the message says how to fix it."""

    exit_code = 2


class UsageError(UserError):
    """A bad option or parameter value."""


class DataError(UserError):
    """The data to run on cannot be used: not what ``data.dvc`` records, an unknown
    revision, a repository or remote that cannot be read."""


class StoreMissingError(UserError):
    """The model store (or a model in it) does not exist."""


class PortInUseError(UserError):
    """The address a server should listen on is taken."""


class StepFailedError(KilnError):
    """A pipeline step failed; the message is the step's own error (from its log)."""

    def __init__(self, step: str, error: str, log: str | None = None) -> None:
        self.step, self.error, self.log = step, error, log
        where = f" (full log: {log})" if log else ""
        super().__init__(f"step {step!r} failed: {error}{where}")


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose mistakes are a :class:`UsageError` (one line, pointing
    at ``--help``) instead of the usage block argparse prints."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


__all__ = ["ArgumentParser", "DataError", "KilnError", "PortInUseError", "StepFailedError", "StoreMissingError",
           "UsageError", "UserError"]
