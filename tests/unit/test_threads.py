"""Thread sizing: the pool follows the CPUs other processes leave free, measured on a
machine the tests simulate (a clock and CPU times they move), so no test needs an idle
machine; benchmarks/machine.py measures trainings sharing real cores."""

from __future__ import annotations

import os

import pytest
import torch

from graft.base import threads
from graft.base.errors import GraftError, ParamsError


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_target_rounds_the_free_cpus():
    assert threads._target(2.0, 0.0) == 2
    assert threads._target(2.0, 0.3) == 2  # a light background process costs no thread
    assert threads._target(2.0, 0.6) == 1
    assert threads._target(2.0, 1.9) == 1  # never below one
    assert threads._target(2.0, 5.0) == 1
    assert threads._target(1.5, 0.0) == 1  # a cgroup quota of 1.5 CPUs: one thread, not two
    assert threads._target(8.0, 3.0) == 5


def test_forced_from_env_and_graft_yaml(tmp_path, monkeypatch):
    from graft.config import project

    def forced():
        return threads.forced_threads(project.load(tmp_path).compute.threads)

    monkeypatch.delenv(threads.FORCE_ENV, raising=False)
    assert forced() is None  # no graft.yaml: auto
    (tmp_path / "graft.yaml").write_text("compute:\n  threads: 3\n")
    assert forced() == 3
    (tmp_path / "graft.yaml").write_text("compute:\n  threads: auto\n")
    assert forced() is None
    monkeypatch.setenv(threads.FORCE_ENV, "1")  # the environment wins
    assert forced() == 1
    monkeypatch.setenv(threads.FORCE_ENV, "many")
    with pytest.raises(GraftError, match=r"GRAFT_THREADS is 'many'.*1 or more"):
        forced()
    monkeypatch.delenv(threads.FORCE_ENV)
    (tmp_path / "graft.yaml").write_text("compute:\n  threads: 0\n")
    with pytest.raises(GraftError, match=r"graft.yaml: compute.threads is 0"):
        forced()
    (tmp_path / "graft.yaml").write_text("compute:\n  thread: 2\n")  # a misspelt key is refused, not ignored
    with pytest.raises(ParamsError, match=r"graft.yaml: unknown key\(s\) compute.thread"):
        forced()


def test_forced_number_is_used_and_never_resized(keep_threads):
    s = threads.ThreadSizer(forced=1, interval=0.0)
    assert s.start() == 1 and torch.get_num_threads() == 1
    assert s.step() is None and s.describe() == "1 (forced)"


def test_affinity_limits_the_pool(keep_threads):
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    try:
        s = threads.ThreadSizer()
        assert s.cpus == [cpus[0]]
        assert s.start() == 1 and torch.get_num_threads() == 1
    finally:
        os.sched_setaffinity(0, set(cpus))


class Machine:
    """A machine whose other processes keep ``load`` CPUs busy, on a clock the test moves:
    the sizer's readings of time and CPU time, without depending on what else runs here."""

    def __init__(self):
        self.now, self.busy, self.load = 1000.0, 0.0, 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.busy += self.load * seconds

    def busy_seconds(self, cpus) -> float:
        return self.busy


def test_busy_cpus_shrink_the_pool_and_free_ones_grow_it(keep_threads, monkeypatch):
    machine = Machine()
    monkeypatch.setattr(threads, "time", machine)
    monkeypatch.setattr(threads, "_busy_seconds", machine.busy_seconds)
    monkeypatch.setattr(threads, "_own_seconds", lambda: 0.0)  # this process: idle between readings
    monkeypatch.setattr(threads, "allowed_cpus", lambda: ([0, 1], 2.0))
    machine.load = 2.0  # every usable CPU busy with another process
    s = threads.ThreadSizer(interval=0.25)  # the test's steps are 0.3 s apart
    assert s.start(probe=0.5) == 1 and torch.get_num_threads() == 1
    assert s.changes[-1][2] == pytest.approx(2.0)  # it saw the others' load
    # The load is gone: the pool grows back, after GROW_AFTER measurements with room.
    machine.load = 0.0
    grown_at = None
    for step in range(1, 10):
        machine.sleep(0.3)
        if s.step(step) is not None:
            grown_at = step
            break
    assert s.threads == 2 and torch.get_num_threads() == 2, s.describe()
    assert grown_at == threads.GROW_AFTER
    # Load again, while "training": the next measurement gives the cores back at once.
    machine.load = 1.8
    machine.sleep(0.3)
    assert s.step(7) == 1 and torch.get_num_threads() == 1, s.describe()
    # Each change at the optimizer step it took effect: what a rerun replays.
    assert s.describe() == f"1; 2 after {threads.GROW_AFTER} steps; 1 after 7 steps"
    # Within the interval nothing is measured: a pool changes at most every interval.
    machine.load = 0.0
    machine.sleep(0.1)
    assert s.step(8) is None


def test_a_recorded_schedule_is_replayed_step_for_step(keep_threads, monkeypatch):
    recorded = "2; 1 after 3 steps; 2 after 5 steps"
    monkeypatch.setenv(threads.SCHEDULE_ENV, recorded)
    s = threads.sizer("test")  # the environment's schedule wins over any forced count
    assert s.plan == [(0, 2), (3, 1), (5, 2)] and torch.get_num_threads() == 2
    sizes = []
    for done in range(1, 8):
        s.step(done)
        sizes.append(torch.get_num_threads())
    assert sizes == [2, 2, 1, 1, 2, 2, 2]  # the size after each step: for the next one
    assert s.describe() == recorded
    # Resumed after 4 steps: the record up to there, the plan from there.
    r = threads.ThreadSizer(plan=s.plan)
    r.start()
    r.resume_at(4, "2; 1 after 3 steps")
    assert torch.get_num_threads() == 1 and r.describe() == "2; 1 after 3 steps"
    r.step(5)
    assert r.describe() == recorded
    monkeypatch.setenv(threads.SCHEDULE_ENV, "2; 1 at 35 s")  # a record in seconds cannot be replayed
    with pytest.raises(GraftError, match=threads.SCHEDULE_ENV):
        threads.sizer("test")


def test_a_resumed_training_records_where_its_pool_differs(keep_threads):
    s = threads.ThreadSizer(forced=None)
    s._set(2, 0.0)
    s.resume_at(6, "2; 1 after 5 steps")  # killed while at 1 thread; resumed at 2
    assert s.describe() == "2; 1 after 5 steps; 2 after 6 steps"
    s.resume_at(6, "2; 1 after 6 steps")  # a change at the checkpoint's step was never trained with
    assert s.describe() == "2"
    s.resume_at(6, None)  # a checkpoint that kept no schedule: said, and not replayable
    assert s.describe() == "unrecorded until step 6; 2" and threads.recorded_schedule(s.describe()) is None
