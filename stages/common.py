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


# When set (the Prefect flow sets it for each stage it runs), the stage writes how it
# ended to this JSON file: {"exit_code": 0|2|1, "message": ...}. The orchestrator reads
# that instead of DVC's console wording: a file written means the stage's code really
# ran (absent after a successful `dvc repro`: DVC restored the outputs from its cache),
# and the exit code and message are the stage's own.
STATUS_ENV = "GRAFT_STAGE_STATUS"

# Fault injection for the tests that kill a real stage at a chosen point, as `kill -9`
# would. GRAFT_FAULT_ONCE names a marker file: the fault fires only while it is absent,
# so a retry of the same stage (same environment) runs through.
FAULT_ENV = "GRAFT_FAULT_POINT"
FAULT_ONCE_ENV = "GRAFT_FAULT_ONCE"


def fault_point(name: str) -> None:
    """A named point in a stage; the process SIGKILLs itself there if GRAFT_FAULT_POINT names it."""
    if os.environ.get(FAULT_ENV) != name:
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def write_status(exit_code: int, message: str = "") -> None:
    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    from stages import fsio

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
            from stages.tracking import refused_message, unreachable_message

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


def progress(iterable, **kwargs):
    """tqdm with graft's defaults, to stderr. On a terminal it redraws every second; in a
    log (not a terminal: the Prefect flow, CI) a bar appears only for work that lasts
    more than 30 s, and then redraws every 30 s, so short steps add no lines at all."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 1.0 if tty else 30.0)
    kwargs.setdefault("delay", 0.0 if tty else 30.0)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
