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
which wins.

The thread count changes a training's last bits (measured: oneDNN's convolution
gradients and train-mode BatchNorm sum over the batch in per-thread parts; making them
independent of the count, with oneDNN off, trained 16x slower), so the pool's sizes are
part of a training's identity: each change is recorded at the optimizer step it took
effect (``2; 1 after 37 steps``), on the run (:data:`TAG`) and in every checkpoint, and a
rerun given that record (:data:`SCHEDULE_ENV`, which ``graft reproduce`` sets) replays it
step for step: the same weights, whatever the machine is doing meanwhile. The stages that
only run forward passes (evaluate, the gate, drift, teach) and serving do not depend on the
count at all, with Intel MKL in its strict reproducible mode
(:func:`graft.base.kernels.thread_independent_blas`).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from graft.base import allocator, kernels
from graft.base.errors import GraftError

FORCE_ENV = "GRAFT_THREADS"
SCHEDULE_ENV = "GRAFT_THREAD_SCHEDULE"  # a recorded TAG to replay step for step (graft reproduce sets it)
INTERVAL_S = 3.0  # between two measurements while training: a few batches
GROW_AFTER = 2  # measurements in a row with room for more threads before growing the pool
TAG = "graft.threads"  # on the training run: ThreadSizer.describe(), the pool's sizes over the training
_CHANGE = re.compile(r"(\d+) after (\d+) steps?")


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
    CPUs left free by other processes. ``forced``: a fixed number (never re-sized).
    ``plan``: a recorded schedule (:func:`recorded_schedule`) replayed step for step instead
    of measuring; ``resize=False``: sized once, at the start (torchrun's ranks, whose
    sizes no single record could replay)."""

    def __init__(self, forced: int | None = None, interval: float = INTERVAL_S, label: str = "graft",
                 plan: list[tuple[int, int]] | None = None, resize: bool = True):  # fmt: skip
        self.forced, self.interval, self.label, self.plan, self.resize = forced, interval, label, plan, resize
        self.cpus, self.limit = allowed_cpus()
        self.threads = 0
        self.changes: list[tuple[float, int, float]] = []  # (time, threads, others) at each change
        # (optimizer steps done when it took effect, threads): what the weights depend on
        self.schedule: list[tuple[int, int]] = []
        self.unrecorded_until: int | None = None  # resumed from a checkpoint that kept no schedule
        self._done = 0  # optimizer steps done, as the training last said
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
        if self.plan:
            self._set(self.plan[0][1], 0.0)
            print(f"{self.label}: torch threads as recorded, replayed step for step ({SCHEDULE_ENV}: "
                  f"{describe_schedule(self.plan)})", flush=True)  # fmt: skip
            return self.threads
        self.measure()
        time.sleep(probe)
        m = self.measure()
        n = m.threads if m else max(1, math.floor(self.limit))
        self._set(n, m.others if m else 0.0)
        busy = f", {m.others:.1f} busy with other processes" if m and m.others >= 0.05 else ""
        when = f"re-sized every {self.interval:g} s while it works" if self.resize else "kept throughout"
        print(f"{self.label}: {n} torch thread(s) ({len(self.cpus)} CPU(s) usable{busy}; {when})", flush=True)
        return n

    def step(self, done: int | None = None) -> int | None:
        """Call between batches, with the optimizer steps done so far (``done``): re-sizes the
        pool when ``interval`` has passed since the last measurement, or as the replayed plan
        says; returns the new size when it changed."""
        if done is not None:
            self._done = done
        if self.forced is not None or not self.resize:
            return None
        if self.plan:
            n = planned(self.plan, self._done)
            if n == self.threads:
                return None
            self._set(n, 0.0)
            return n
        if self._last is None or time.monotonic() - self._last[0] < self.interval:
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

    def resume_at(self, done: int, recorded: str | None) -> None:
        """A training resumed from a checkpoint after ``done`` optimizer steps: the schedule
        up to there is the checkpoint's (``recorded``, its :meth:`describe`); the pool goes on
        from here as planned, or at the size it has now (a change at ``done`` if it differs)."""
        self._done = done
        past = recorded_schedule(recorded)
        n = planned(self.plan, done) if self.plan else self.threads
        self._set(n, 0.0)
        if past is None:
            self.schedule, self.unrecorded_until = [(done, n)], done
            return
        self.schedule = [(s, m) for s, m in past if s < done]
        if not self.schedule or self.schedule[-1][1] != n:
            self.schedule.append((done, n))

    def describe(self) -> str:
        """The pool's sizes over the work, for the run's record and the checkpoint: ``2``,
        or ``2; 1 after 37 steps; 2 after 120 steps`` (each change at the optimizer step it
        took effect, what :data:`SCHEDULE_ENV` replays); ``(forced)`` when forced."""
        if not self.schedule:
            return "unset"
        head = f"unrecorded until step {self.unrecorded_until}; " if self.unrecorded_until is not None else ""
        return head + describe_schedule(self.schedule) + (" (forced)" if self.forced is not None else "")

    def _set(self, n: int, others: float) -> None:
        import torch  # torch: ~2 s of import, paid where a model runs

        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n
            self.changes.append((time.monotonic(), n, others))
            if self.schedule and self.schedule[-1][0] == self._done:
                self.schedule[-1] = (self._done, n)  # two changes before one step: the last one counts
            else:
                self.schedule.append((self._done, n))


def describe_schedule(schedule: list[tuple[int, int]]) -> str:
    first, *later = schedule
    return "; ".join([str(first[1]), *(f"{n} after {s} steps" for s, n in later)])


def planned(plan: list[tuple[int, int]], done: int) -> int:
    """The pool size a schedule gives after ``done`` optimizer steps."""
    n = plan[0][1]
    for s, m in plan:
        if s > done:
            break
        n = m
    return n


def recorded_schedule(described: str | None) -> list[tuple[int, int]] | None:
    """A run's :data:`TAG` as a replayable schedule, [(steps done, threads), ...] from step
    0; None where it cannot be replayed: nothing recorded, or a record from before graft
    kept the steps (``2; 1 at 35 s``), or one with an unrecorded stretch."""
    text = (described or "").replace("(forced)", "").strip()
    parts = [x.strip() for x in text.split(";")] if text else []
    if not parts or not parts[0].isdigit():
        return None
    out = [(0, int(parts[0]))]
    for part in parts[1:]:
        m = _CHANGE.fullmatch(part)
        if m is None:
            return None
        out.append((int(m.group(2)), int(m.group(1))))
    return out


def recorded_pool(described: str | None) -> tuple[int, bool] | None:
    """Read back a run's :data:`TAG` (:meth:`ThreadSizer.describe`): the pool size its work
    started with, and whether the pool changed during it; None where nothing was recorded."""
    m = re.match(r"\s*(\d+)", described or "")
    if m is None:
        return None
    return int(m.group(1)), ";" in (described or "")


def sizer(label: str, configured: object = None, resize: bool = True, training: bool = False) -> ThreadSizer:
    """A started :class:`ThreadSizer` for a stage, honouring a forced number (``configured``:
    graft.yaml's ``compute.threads``; ``GRAFT_THREADS`` wins over it) and a recorded schedule
    to replay (:data:`SCHEDULE_ENV`, which wins over both). Every stage that runs torch calls
    this before any torch work, so the process's C allocator is set for torch here too
    (:mod:`graft.base.allocator`), and, where the stage only runs forward passes (not
    ``training``), MKL's thread-independent mode (:func:`graft.base.kernels.thread_independent_blas`).
    A training keeps MKL as it was: its convolutions' gradients follow the pool whatever MKL
    does, its schedule is recorded instead, and its weights stay those it gave before."""
    if not training:
        kernels.thread_independent_blas()
    allocator.tune()
    replay = os.environ.get(SCHEDULE_ENV, "").strip()
    plan = recorded_schedule(replay) if replay else None
    if replay and plan is None:
        raise GraftError(f"the environment variable {SCHEDULE_ENV} is {replay!r}: give a schedule as graft records "
                         "it on the training run (tag graft.threads), e.g. '2; 1 after 37 steps', or unset it")  # fmt: skip
    s = ThreadSizer(None if plan else forced_threads(configured), label=label, plan=plan, resize=resize)
    s.start()
    return s
