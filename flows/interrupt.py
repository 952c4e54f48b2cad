"""Ctrl-C and SIGTERM for a command that runs the pipeline: stop everything it started,
within seconds, say so in one line, exit 130 (SIGINT) or 143 (SIGTERM).

What happens without this: the terminal's Ctrl-C reaches every process of the foreground
group, Prefect's temporary server among them, which dies at once; the flow engine then
reports the crash to that dead server with retries, printing connection errors for
minutes, and SIGTERM (a scheduler, ``systemctl stop``) is not heard at all while it does.

With :func:`handled`: the first signal raises ``KeyboardInterrupt`` in the main thread,
so the stage's task kills the stage's process group (``flows/training.py``) and Prefect
marks the run Crashed where its server still answers; a watchdog ends the process after
:data:`GRACE_S` whatever is still waiting. From then on nothing more is printed (no
connection errors, no traceback), every process this one started (the stage, DVC,
torchrun's ranks, Prefect's temporary server) is stopped, and the exit code says which
signal it was. A second signal ends it at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import psutil

from graft.base import processes

GRACE_S = 5.0  # for the flow to stop the stage and record the crash where its server answers
KILL_AFTER_S = 3.0  # from SIGTERM to SIGKILL, for the processes left when it ends


class Interrupted(Exception):
    """The run was stopped by a signal: ``signum`` and the exit code it maps to."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shells' convention: 130 for SIGINT, 143 for SIGTERM


def stop_descendants(timeout: float = KILL_AFTER_S) -> None:
    """SIGTERM every process this one started (children's children included), then
    SIGKILL what is still alive after ``timeout`` seconds."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    processes.terminate(procs, timeout)


def _silence() -> None:
    """Nothing more on the terminal: what is left to say after the one line is the
    flow engine failing to reach a server that is gone, or a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def _end(code: int) -> None:
    stop_descendants()
    os._exit(code)  # no interpreter shutdown: Prefect's exit hooks would talk to the dead server again


@contextmanager
def handled(what: str = "graft run") -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the run as the module docstring says;
    an interrupted block raises :class:`Interrupted` (after everything it started has
    been stopped), which the caller turns into its exit code."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if received:  # the second: at once
            _silence()
            _end(128 + signum)
        received.append(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: interrupted ({name}): stopping the stage and every process it started; "
              "the next run resumes from the last finished stage and the training's last checkpoint",
              file=sys.stderr, flush=True)  # fmt: skip
        _silence()
        watchdog = threading.Timer(GRACE_S, _end, args=(128 + signum,))
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt  # into the flow, which stops the stage and records the crash

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except BaseException:
        if not received:
            raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        stop_descendants()
        raise Interrupted(received[0])
