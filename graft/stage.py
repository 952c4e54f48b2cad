"""How a stage's ``main()`` ends: bad input becomes one line for a person and exit 2, a
server that is unreachable becomes a retryable exit 1, and under the flow every outcome
is written to the status file the orchestrator reads.

It sits above the domain layer because it recognises MLflow's refusals (``tracking``).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from graft.base import fsio, threads
from graft.base.errors import BAD_INPUT_EXIT, STATUS_ENV, GraftError, ParamsError
from graft.config import project
from graft.tracking.runs import refused_message, unreachable_message

F = TypeVar("F", bound=Callable[..., object])


def write_status(exit_code: int, message: str = "") -> None:
    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    fsio.write_json(path, {"exit_code": exit_code, "message": message})


def stage_main(fn: F) -> F:
    """Run a stage's ``main``; print a ``GraftError``/``ParamsError`` without a traceback
    and exit with ``BAD_INPUT_EXIT``, so DVC and the flow stop with the stage's message.
    Under the flow (``STATUS_ENV`` set) the outcome also goes to the status file, and the
    message is left to the flow to show once."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("DVC_NO_ANALYTICS", "1")
        try:
            result = fn(*args, **kwargs)
        except (GraftError, ParamsError) as e:
            write_status(BAD_INPUT_EXIT, str(e))
            if not os.environ.get(STATUS_ENV):
                print(f"\nerror: {e}", file=sys.stderr, flush=True)
            raise SystemExit(BAD_INPUT_EXIT) from None
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            write_status(code, "" if isinstance(e.code, int) or e.code is None else str(e.code))
            raise
        except Exception as e:
            refused = refused_message(e)
            if refused is not None:  # a login or a grant is missing: no retry helps
                write_status(BAD_INPUT_EXIT, refused)
                if not os.environ.get(STATUS_ENV):
                    print(f"\nerror: {refused}", file=sys.stderr, flush=True)
                raise SystemExit(BAD_INPUT_EXIT) from None
            message = unreachable_message(e)
            if message is None:
                write_status(1, f"{type(e).__name__}: {e}")
                raise
            write_status(1, message)  # worth a retry once the server is back: not bad input
            if not os.environ.get(STATUS_ENV):
                print(f"\nerror: {message}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except BaseException as e:
            write_status(1, f"{type(e).__name__}: {e}")
            raise
        write_status(0)
        return result

    return wrapper  # type: ignore[return-value]


def thread_sizer(label: str, resize: bool = True, training: bool = False) -> threads.ThreadSizer:
    """torch's thread pool for a stage (:func:`graft.base.threads.sizer`), with graft.yaml's
    ``compute.threads``; every stage that runs torch calls this before any torch work.
    ``resize=False``: sized once (torchrun's ranks); ``training``: the stage trains."""
    return threads.sizer(label, project.load().compute.threads, resize=resize, training=training)
