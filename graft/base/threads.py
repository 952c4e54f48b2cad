"""How many threads torch may use: as many CPUs as this process can actually get.

torch sizes its thread pool to the machine's cores, as if it had them alone. On a shared
machine that collapses: three trainings on the same 2 cores measured 9 to 10 s a batch
instead of 0.25 s alone, because OpenMP's threads wait for each other's slowest member
(spinning, then sleeping) and each pool keeps losing its cores to the others. So graft
counts the CPUs this process may run on (its CPU affinity, and its cgroup's CPU quota
in a container), subtracts what the other processes are using on them right now, and
keeps measuring while it works: a :class:`ThreadSizer` is told each batch and re-sizes
the pool every few seconds, fewer threads as soon as others need the cores, more only
when they have stayed free.

A fixed number can be forced: ``compute.threads`` in ``graft.yaml`` (how graft runs, not
how the model trains: it never reruns a stage), or ``GRAFT_THREADS`` in the environment,
which wins. The thread count is not a hyperparameter: it is no part of a checkpoint's
identity, so a training resumed with another count goes on from its checkpoint. It does
change the result's last bits, though (measured: the tests' tiny training ends with
another validation accuracy at 1 thread than at 2), so a rerun that must give identical
weights runs at the count recorded on the training run: ``graft reproduce`` forces it.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from graft.base import allocator
from graft.base.errors import GraftError

FORCE_ENV = "GRAFT_THREADS"
INTERVAL_S = 3.0  # between two measurements while training: a few batches
GROW_AFTER = 2  # measurements in a row with room for more threads before growing the pool
TAG = "graft.threads"  # on the training run: ThreadSizer.describe(), the pool's sizes over the training


def allowed_cpus() -> tuple[list[int], float]:
    """The CPUs this process may run on (its affinity), and how many of them it may use
    at once (fewer under a cgroup CPU quota, as in a container with ``--cpus``)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    limit = float(len(cpus))
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            limit = min(limit, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cpus, max(limit, 1.0)


def _busy_seconds(cpus: list[int]) -> float | None:
    """CPU seconds spent busy so far on ``cpus``, all processes together (psutil's per-CPU
    times: user, nice, system, irq, softirq and steal; idle and iowait are not busy)."""

    try:
        times = psutil.cpu_times(percpu=True)
    except (OSError, NotImplementedError):  # /proc/stat unreadable, or a platform without it
        return None
    busy = 0.0
    for c in cpus:
        if c < len(times):
            t = times[c]
            busy += t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + \
                getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)  # fmt: skip
    return busy


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def forced_threads(configured: object = None) -> int | None:
    """The number forced by ``GRAFT_THREADS``, else by ``configured`` (graft.yaml's
    ``compute.threads``, which the caller reads: :func:`graft.stage.thread_sizer`);
    None for ``auto``."""
    value: object = os.environ.get(FORCE_ENV)
    where = f"the environment variable {FORCE_ENV}"
    if value in (None, ""):
        value, where = configured, "graft.yaml: compute.threads"
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise GraftError(f"{where} is {value!r}: give a number of threads (1 or more), or auto")
    return n


@dataclass
class Measure:
    cpus: int  # CPUs this process may use at once
    others: float  # CPUs busy with other processes, on average over the interval
    threads: int  # what would use the rest


def _target(limit: float, others: float) -> int:
    free = limit - others
    # Rounded to nearest: a background process at 0.3 CPU costs no thread, one at 0.6 does.
    return max(1, min(math.floor(limit), math.floor(free + 0.5)))


class ThreadSizer:
    """Sizes torch's thread pool now, and again every ``interval`` seconds of work, to the
    CPUs left free by other processes. ``forced``: a fixed number (never re-sized)."""

    def __init__(self, forced: int | None = None, interval: float = INTERVAL_S, label: str = "graft"):
        self.forced, self.interval, self.label = forced, interval, label
        self.cpus, self.limit = allowed_cpus()
        self.threads = 0
        self.changes: list[tuple[float, int, float]] = []  # (time, threads, others) at each change
        self._grow = 0
        self._last: tuple[float, float | None, float] | None = None

    def _sample(self) -> tuple[float, float | None, float]:
        return time.monotonic(), _busy_seconds(self.cpus), _own_seconds()

    def measure(self) -> Measure | None:
        """What the other processes used since the last call (None on the first, or where
        /proc/stat cannot be read)."""
        now = self._sample()
        last, self._last = self._last, now
        if last is None or now[1] is None or last[1] is None or now[0] <= last[0]:
            return None
        wall = now[0] - last[0]
        others = max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall)
        return Measure(len(self.cpus), others, _target(self.limit, others))

    def start(self, probe: float = 0.3) -> int:
        """Size the pool before the work starts (a short look at the machine's load)."""
        if self.forced is not None:
            self._set(self.forced, 0.0)
            print(f"{self.label}: {self.forced} torch thread(s), as forced ({FORCE_ENV} or graft.yaml compute.threads)")
            return self.forced
        self.measure()
        time.sleep(probe)
        m = self.measure()
        n = m.threads if m else max(1, math.floor(self.limit))
        self._set(n, m.others if m else 0.0)
        busy = f", {m.others:.1f} busy with other processes" if m and m.others >= 0.05 else ""
        print(f"{self.label}: {n} torch thread(s) ({len(self.cpus)} CPU(s) usable{busy}; "
              f"re-sized every {self.interval:g} s while it works)", flush=True)  # fmt: skip
        return n

    def step(self) -> int | None:
        """Call between batches: re-sizes the pool when ``interval`` has passed since the
        last measurement; returns the new size when it changed."""
        if self.forced is not None or self._last is None or time.monotonic() - self._last[0] < self.interval:
            return None
        m = self.measure()
        if m is None:
            return None
        if m.threads < self.threads:  # others need the cores now: give them back at once
            self._grow = 0
            self._set(m.threads, m.others)
            return m.threads
        if m.threads > self.threads:  # grow only once the room has lasted
            self._grow += 1
            if self._grow >= GROW_AFTER:
                self._grow = 0
                self._set(self.threads + 1, m.others)
                return self.threads
        else:
            self._grow = 0
        return None

    def describe(self) -> str:
        """The pool's sizes over the work, for the run's record: ``2`` or ``2; 1 at 35 s
        (1.1 CPU busy elsewhere); 2 at 120 s``."""
        if not self.changes:
            return "unset"
        t0 = self.changes[0][0]
        later = [f"{n} at {t - t0:.0f} s ({o:.1f} CPU busy elsewhere)" for t, n, o in self.changes[1:]]
        return "; ".join([str(self.changes[0][1]), *later]) + (" (forced)" if self.forced is not None else "")

    def _set(self, n: int, others: float) -> None:
        import torch  # torch: ~2 s of import, paid where a model runs

        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n
            self.changes.append((time.monotonic(), n, others))


def recorded_pool(described: str | None) -> tuple[int, bool] | None:
    """Read back a run's :data:`TAG` (:meth:`ThreadSizer.describe`): the pool size its work
    started with, and whether the pool changed during it; None where nothing was recorded.
    The same seeded training gives other weights at another thread count (its reductions
    add up in other orders), so ``graft reproduce`` reruns with the recorded one."""
    m = re.match(r"\s*(\d+)", described or "")
    if m is None:
        return None
    return int(m.group(1)), ";" in (described or "")


def sizer(label: str, configured: object = None) -> ThreadSizer:
    """A started :class:`ThreadSizer` for a stage, honouring a forced number (``configured``:
    graft.yaml's ``compute.threads``; ``GRAFT_THREADS`` wins over it). Every stage
    that runs torch calls this before any torch work, so the process's C allocator is set
    for torch here too (:mod:`graft.base.allocator`)."""
    allocator.tune()
    s = ThreadSizer(forced_threads(configured), label=label)
    s.start()
    return s
