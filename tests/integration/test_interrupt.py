"""Ctrl-C as a terminal sends it, and SIGTERM as a scheduler does, during a real training:
`graft run` stops the stage and every process it started within seconds, prints one line
and no traceback, exits 130 (or 143), and the next run resumes and finishes.

The run happens in a pseudo-terminal of its own (its own session, the terminal's
foreground process group): writing the interrupt character to the terminal is what
pressing Ctrl-C does, so the kernel sends SIGINT to every process of that group, as in a
real terminal (a background process started by a non-interactive shell ignores SIGINT,
so a plain `kill -INT` would prove nothing). No graft servers: Prefect's temporary server
is one of the processes that must not outlive the run.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import termios
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import copy_project, project_env, requires_fashion_mnist, set_params

pytestmark = [pytest.mark.slow, requires_fashion_mnist]

# Enough epochs that fine_tune is still training when the signal comes.
SLOW = dict(
    ingest={"max_train_per_class": 12, "max_test_per_class": 4},
    preprocess={"image_size": 32},
    fine_tune={"epochs": 15, "batch_size": 16, "mode": "partial", "frozen_groups": 4, "patience": 99},
    register={"min_accuracy": 0.0},
    drift={"reference": None},
)
STOPPED_WITHIN_S = 15  # from the signal to the exit, everything stopped (the watchdog: 5 s, then 3 s to SIGKILL)


class Terminal:
    """`graft run` in a pseudo-terminal: its output, the interrupt key, its exit."""

    def __init__(self, project: Path, env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a new session whose controlling terminal is the pty
            os.chdir(project)
            os.execvpe(sys.executable, [sys.executable, "-m", "flows.cli", "run"], env)
        self.output = b""

    def read_until(self, text: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.output and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal: it ended
                    return text in self.output
                if not chunk:
                    break
                self.output += chunk
        return text in self.output

    def press_ctrl_c(self) -> None:
        # A program that left the terminal in raw mode would make the key a plain character.
        assert termios.tcgetattr(self.fd)[3] & termios.ISIG, "the terminal no longer turns Ctrl-C into SIGINT"
        assert os.tcgetpgrp(self.fd) == self.pid, "another process group took the terminal's foreground"
        os.write(self.fd, b"\x03")  # the terminal's intr character: SIGINT to the foreground group

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_until(b"\x00never", 0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.read_until(b"\x00never", 0.5)
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        return None


def left_running(project: Path) -> list[str]:
    """Processes of this project still alive: the stage, DVC, Prefect's temporary server."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or ())
            if proc.pid != os.getpid() and (str(project) in cmd or proc.info["cwd"] == str(project)
                                            or proc.environ().get("PREFECT_HOME", "").startswith(str(project))):  # fmt: skip
                found.append(f"{proc.pid} {cmd[:120]}")
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def slow_project(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("interrupt") / "project")
    set_params(project, **SLOW)
    env = {**project_env(project), "PREFECT_HOME": str(project / ".prefect-home"), "TERM": "xterm"}
    env.pop("PREFECT_API_URL", None)
    yield project, env
    for line in left_running(project):  # a failed test must not leave its run behind
        try:
            psutil.Process(int(line.split()[0])).kill()
        except psutil.Error:
            pass


def interrupted_during_training(project: Path, env: dict[str, str], send, when: bytes) -> tuple[int | None, str, float]:
    term = Terminal(project, env)
    assert term.read_until(when, timeout=400), term.output.decode(errors="replace")[-3000:]
    t0 = time.monotonic()
    send(term)
    code = term.wait(timeout=60)
    (project / "interrupted.log").write_bytes(term.output)  # kept for a failure's post-mortem
    return code, term.output.decode(errors="replace"), time.monotonic() - t0


def test_ctrl_c_and_sigterm_stop_everything_and_the_rerun_resumes(slow_project):
    project, env = slow_project

    # Once epoch 2 is reported, epoch 1's checkpoint is on disk.
    code, said, took = interrupted_during_training(project, env, Terminal.press_ctrl_c, b"epoch 2/15: train loss")
    assert code == 130, said[-3000:]
    assert took < STOPPED_WITHIN_S, (took, said[-2000:])
    assert "graft run: interrupted (Ctrl-C)" in said and "resumes" in said, said[-2000:]
    after = said.split("graft run: interrupted", 1)[1]
    assert "Traceback" not in after and "Error logging to API" not in after, after[-3000:]
    assert left_running(project) == []

    # SIGTERM to `graft run` alone (a scheduler stopping it): the same, with 143.
    code, said, took = interrupted_during_training(project, env, lambda t: os.kill(t.pid, signal.SIGTERM),
                                                   b"fine_tune: resuming after epoch")  # fmt: skip
    assert code == 143, said[-3000:]
    assert took < STOPPED_WITHIN_S, (took, said[-2000:])
    assert "graft run: interrupted (SIGTERM)" in said, said[-2000:]
    assert "Traceback" not in said.split("graft run: interrupted", 1)[1]
    assert left_running(project) == []

    # The rerun picks up where the training stopped and finishes.
    term = Terminal(project, env)
    code = term.wait(timeout=600)
    said = term.output.decode(errors="replace")
    assert code == 0, said[-3000:]
    assert "fine_tune: resuming after epoch" in said, said[-3000:]
    assert "graft run: done" in said
    assert left_running(project) == []


def test_ctrl_c_through_make_run_with_the_servers_up_at_a_random_moment(slow_project):
    """`make run` as the README has it, graft's servers up, Ctrl-C at a moment drawn at
    random within the run: make and graft run end, nothing the run started is left (the
    servers, which `graft server start` owns, keep running), no traceback after graft's
    line, and the rerun finishes."""
    import random
    import subprocess

    project, env = slow_project
    set_params(project, fine_tune={"seed": 7})  # work for the run to be interrupted in: a new training
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)  # `make` finds graft's environment there
    start = subprocess.run([sys.executable, "-m", "flows.cli", "server", "start"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=180)  # fmt: skip
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    servers = {line.split()[0] for line in left_running(project)}
    try:
        seed = random.randrange(2**32)
        delay = random.Random(seed).uniform(3, 50)
        print(f"Ctrl-C {delay:.1f} s after `make run` started (seed {seed})")
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(project)
            os.execvpe("make", ["make", "-o", "setup", "run"], env)  # -o setup: the environment is the symlink's
        term = Terminal.__new__(Terminal)
        term.pid, term.fd, term.output = pid, fd, b""
        term.read_until(b"\x00never", delay)
        term.press_ctrl_c()
        t0 = time.monotonic()
        code = term.wait(timeout=60)
        said = term.output.decode(errors="replace")
        assert code is not None and time.monotonic() - t0 < STOPPED_WITHIN_S, said[-3000:]
        if "graft run: done" not in said:  # the moment fell before the run ended
            assert code in (2, 130, -signal.SIGINT), (code, said[-3000:])
            if "graft run: interrupted" in said:
                assert "Traceback" not in said.split("graft run: interrupted", 1)[1], said[-3000:]
        left = [line for line in left_running(project) if line.split()[0] not in servers]
        assert left == [], left
        assert {line.split()[0] for line in left_running(project)} >= servers  # the servers are not the run's

        rerun = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=project, env=env, capture_output=True,
                               text=True, timeout=600)  # fmt: skip
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert "graft run: done" in rerun.stdout
    finally:
        subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], cwd=project, env=env, capture_output=True,
                       timeout=120)  # fmt: skip
