"""User-facing errors and the CLI wrapper that turns them into one line and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class TuneAgbError(Exception):
    """A problem with the user's input (data, config, flags): printed as one line, no traceback."""


class DivergenceError(TuneAgbError):
    """Training produced a non-finite loss or metric; ``metrics`` holds that epoch's values."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


class InfeasibleError(TuneAgbError):
    """A configuration cannot run on its device share (it would run out of memory); ``reason`` says why, with the
    bytes it needs (``required``, None when unknown) and those it may use (``available``)."""

    def __init__(self, reason: str, required: int | None = None, available: int | None = None):
        super().__init__(reason)
        self.reason, self.required, self.available = reason, required, available


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main``; a :class:`TuneAgbError` becomes ``error: ...`` on stderr and exit code 2."""
    try:
        code = main(argv)
    except TuneAgbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
