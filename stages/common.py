"""What every stage's ``main()`` shares: the error type for bad input and the wrapper
that turns it into a message for a person and a non-zero exit."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from stages.config import ParamsError

F = TypeVar("F", bound=Callable[..., object])

# A stage exits with this code when its input is bad (a failed data check, a wrong
# parameter): rerunning cannot help, so the flow does not retry it. Any other non-zero
# exit (a crash, a tracking server that blipped) may be retried. argparse uses 2 as well.
BAD_INPUT_EXIT = 2


class GraftError(Exception):
    """Bad input or a failed check: the message names the file or key and what to do."""


def stage_main(fn: F) -> F:
    """Run a stage's ``main``; print a ``GraftError``/``ParamsError`` without a traceback
    and exit with ``BAD_INPUT_EXIT``, so DVC and the flow stop with the stage's message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("DVC_NO_ANALYTICS", "1")
        try:
            return fn(*args, **kwargs)
        except (GraftError, ParamsError) as e:
            print(f"\nerror: {e}", file=sys.stderr, flush=True)
            raise SystemExit(BAD_INPUT_EXIT) from None

    return wrapper  # type: ignore[return-value]


def progress(iterable, **kwargs):
    """tqdm with graft's defaults: to stderr; in a log (not a terminal) it redraws every
    30 s instead of every second, so logs stay readable."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 1.0 if sys.stderr.isatty() else 30.0)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
