"""One error family and one way to report it.

Every expected failure — a bad argument, file, setting, checkpoint or data source — is raised as a
`FlexvarError` subclass whose message names the argument, file or key and says what to do
(`ConfigError`, `CheckpointError`, `DataError`, `MetricsError`, `ScheduleError`, `MaskError`,
`TrackingError`, `UsageError`, ...). `run_command` is the one place that turns such an error into
the user-facing contract: one line on stderr, `<prog>: error: <message>`, exit code 2, no
traceback. Every `flexvar` subcommand and every pipeline stage goes through it; anything else
(a bug) still raises with its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from typing import Callable, Iterator

USAGE_EXIT = 2

# Path problems the OS reports (a folder where a file is expected, no permission, ...): the user's
# input, not a bug, so they are reported like a FlexvarError, naming the path.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class FlexvarError(Exception):
    """An expected failure caused by the user's input; the message names what is wrong and what to do.

    `exit_code` is what `run_command` exits with: 2 (bad input) unless a subclass says otherwise
    (flows: a failed stage 1, an interrupted sweep 130)."""
    exit_code = 2


class UsageError(FlexvarError):
    """A bad command-line argument or input file; the message starts with the argument's name."""


def usage(arg: str, msg: str) -> UsageError:
    """UsageError whose message starts with the argument it is about (`--out: ...`)."""
    return UsageError(f"{arg}: {msg}")


@contextlib.contextmanager
def about(arg: str) -> Iterator[None]:
    """Errors raised in the body (a FlexvarError or an OS path error) are re-raised naming `arg`."""
    try:
        yield
    except (FlexvarError, *PATH_ERRORS) as e:
        text = describe(e)
        if text.startswith(f"{arg}:"):
            raise
        raise usage(arg, text) from None


def one_line(message: object) -> str:
    """A multi-line message (e.g. several bad params keys) joined into one line."""
    return "; ".join(s.strip() for s in str(message).splitlines() if s.strip())


def describe(e: BaseException) -> str:
    """The one-line text of an expected error; OS path errors name their path."""
    if isinstance(e, OSError) and not isinstance(e, FlexvarError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or type(e).__name__}"
    return one_line(e)


def run_command(prog: str, fn: Callable[..., int | None], *args) -> int:
    """Call `fn(*args)`; a FlexvarError or OS path error becomes one stderr line and exit code 2
    (a FlexvarError's own `exit_code`)."""
    try:
        return int(fn(*args) or 0)
    except (FlexvarError, *PATH_ERRORS) as e:
        print(f"{prog}: error: {describe(e)}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", USAGE_EXIT)


def command(prog: str):
    """Decorator for a `main(argv)` entry point: runs it through `run_command` under the name `prog`."""
    def wrap(fn: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            return run_command(prog, fn, argv)
        return main
    return wrap


def one_line_parser_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse errors as one stderr line (no usage dump), exit 2 — the same contract as run_command."""
    def error(message: str):
        print(f"{parser.prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT)
    parser.error = error
    return parser
