"""Thread sizing against real load: busy processes started here, measured through /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from graft.base import threads
from graft.base.errors import GraftError, ParamsError

BUSY = "while True: pass"


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def busy(n: int, cpus: list[int]) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-c", BUSY])
        os.sched_setaffinity(p.pid, {cpus[i % len(cpus)]})
        procs.append(p)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


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


@pytest.mark.serial  # "free" means free of every process, the other test worker's too
def test_busy_cpus_shrink_the_pool_and_free_ones_grow_it(keep_threads):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs to see a pool shrink")
    procs = busy(len(cpus), cpus)  # every usable CPU busy with another process
    try:
        time.sleep(0.3)
        s = threads.ThreadSizer(interval=0.3)
        assert s.start(probe=0.5) == 1
        assert s.changes[-1][2] >= 0.5 * len(cpus)  # it saw the others' load
    finally:
        stop(procs)
    # The load is gone: the pool grows back, one thread per GROW_AFTER measurements.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and s.threads < 2:
        time.sleep(0.1)
        s.step()
    assert s.threads >= 2, s.describe()
    # Load again, while "training": the next measurement gives the cores back at once.
    procs = busy(len(cpus), cpus)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and s.threads > 1:
            time.sleep(0.1)
            s.step()
        assert s.threads == 1 and torch.get_num_threads() == 1, s.describe()
    finally:
        stop(procs)
    assert "CPU busy elsewhere" in s.describe()
