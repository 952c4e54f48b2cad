"""Stopping processes the orderly way: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import psutil


def terminate(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM ``procs``, SIGKILL those still alive after ``grace`` seconds, and reap our
    own children among them; a process already gone is skipped."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
