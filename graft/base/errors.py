"""The errors graft raises for bad input, the exit code they map to, the fault points the
kill tests use, and the progress bar every long step shows."""

from __future__ import annotations

import os
import signal
import sys

# A stage exits with this code when its input is bad (a failed data check, a wrong
# parameter): rerunning cannot help, so the flow does not retry it. Any other non-zero
# exit (a crash, a tracking server that blipped) may be retried. argparse uses 2 as well.
BAD_INPUT_EXIT = 2


class GraftError(Exception):
    """Bad input or a failed check: the message names the file or key and what to do."""


class ParamsError(GraftError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range (``params.yaml``,
    ``graft.yaml``, a ``--set``): bad input, like any :class:`GraftError`."""


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

    os.kill(os.getpid(), signal.SIGKILL)


def progress(iterable, **kwargs):
    """tqdm with graft's defaults, to stderr. On a terminal it redraws every second; in a
    log (not a terminal: the Prefect flow, CI) a bar appears only for work that lasts
    more than 30 s, and then redraws every 30 s, so short steps add no lines at all."""
    from tqdm.auto import tqdm  # tqdm.auto probes for Jupyter: only when a bar is drawn

    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 1.0 if tty else 30.0)
    kwargs.setdefault("delay", 0.0 if tty else 30.0)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
