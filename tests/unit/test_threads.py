"""Thread sizing against real load: busy processes started here, measured through /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from graft.base import threads
from graft.base.errors import GraftError

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
    monkeypatch.delenv(threads.FORCE_ENV, raising=False)
    assert threads.forced_threads(tmp_path) is None  # no graft.yaml: auto
    (tmp_path / "graft.yaml").write_text("compute:\n  threads: 3\n")
    assert threads.forced_threads(tmp_path) == 3
    (tmp_path / "graft.yaml").write_text("compute:\n  threads: auto\n")
    assert threads.forced_threads(tmp_path) is None
    monkeypatch.setenv(threads.FORCE_ENV, "1")  # the environment wins
    assert threads.forced_threads(tmp_path) == 1
    monkeypatch.setenv(threads.FORCE_ENV, "many")
    with pytest.raises(GraftError, match=r"GRAFT_THREADS is 'many'.*1 or more"):
        threads.forced_threads(tmp_path)
    monkeypatch.delenv(threads.FORCE_ENV)
    (tmp_path / "graft.yaml").write_text("compute:\n  threads: 0\n")
    with pytest.raises(GraftError, match=r"graft.yaml: compute.threads is 0"):
        threads.forced_threads(tmp_path)


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
