"""The library's error family: expected failures (bad input, arguments, files, settings) that a
command prints as one line naming what is wrong, without a traceback, and exits 2."""
from __future__ import annotations


class FlexvarError(Exception):
    """Base of every expected, user-facing error."""


class UsageError(FlexvarError):
    """A bad command-line argument or input file: printed as `flexvar <cmd>: error: <message>`, exit 2."""
