import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect server for the session (about 7 s to start)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def project_run_env(project, monkeypatch):
    """Point this process (the flow, the CLI) at the project copy's stores."""
    from tests.conftest import project_env

    for key, value in project_env(project).items():
        if key in ("MLFLOW_TRACKING_URI", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS", "TQDM_MININTERVAL"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return project


# One user per pytest-xdist worker: two modules with an sshd may run at once, and each
# fixture deletes its user (and kills its processes) when it is done.
SSH_USER = "graft-remote" + (f"-{os.environ['PYTEST_XDIST_WORKER']}" if os.environ.get("PYTEST_XDIST_WORKER") else "")


def kill_all(procs: list, timeout: float = 30) -> None:
    """SIGKILL these psutil processes (those already gone are skipped) and reap them."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _kill_user_processes(user: str) -> None:
    import psutil

    kill_all([p for p in psutil.process_iter(["username"]) if p.info["username"] == user], timeout=10)


@pytest.fixture(scope="module")
def sshd():
    """A real OpenSSH server on a free loopback port (Debian's openssh-server), with a
    dedicated user whose home is a fresh directory and key authentication only; started
    and stopped here. Yields its user, port, client key, the user's home, and a client
    HOME whose ~/.ssh/known_hosts trusts the server's host key (set HOME to it). Needs
    root (sshd switches to the user), as on the build machine."""
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd_bin).exists() or os.geteuid() != 0:
        pytest.skip("needs root and Debian's openssh-server (make sshd installs it)")
    base = Path(tempfile.mkdtemp(prefix="graft-sshd-"))
    base.chmod(0o755)  # the user must reach its home below it
    home = base / "home"
    try:
        pwd.getpwnam(SSH_USER)
        # Sessions of an earlier server (a client's connection pool keeps them open) hold the user.
        _kill_user_processes(SSH_USER)
        subprocess.run(["usermod", "--home", str(home), SSH_USER], check=True, capture_output=True)
    except KeyError:
        subprocess.run(["useradd", "--home-dir", str(home), "--shell", "/bin/sh", SSH_USER], check=True, capture_output=True)
    # '*': no password, but not a locked account (sshd without PAM refuses locked ones).
    subprocess.run(["usermod", "--password", "*", SSH_USER], check=True, capture_output=True)
    user = pwd.getpwnam(SSH_USER)
    (home / ".ssh").mkdir(parents=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / key)], check=True)
    (home / ".ssh" / "authorized_keys").write_text((base / "client_key.pub").read_text())
    for path in (home, home / ".ssh", home / ".ssh" / "authorized_keys"):
        os.chown(path, user.pw_uid, user.pw_gid)
    (home / ".ssh").chmod(0o700)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = base / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base / 'host_key'}\nPidFile {base / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "AuthorizedKeysFile .ssh/authorized_keys\nUsePAM no\nStrictModes yes\n"
        "Subsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    log = base / "sshd.log"
    proc = subprocess.Popen([sshd_bin, "-D", "-E", str(log), "-f", str(config)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(f"sshd did not start: {log.read_text() if log.exists() else ''}")
    client_home = base / "client-home"
    (client_home / ".ssh").mkdir(parents=True)
    host_key = (base / "host_key.pub").read_text().split()
    (client_home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    from types import SimpleNamespace

    try:
        yield SimpleNamespace(user=SSH_USER, port=port, key=base / "client_key", home=home, client_home=client_home,
                              url=lambda path: f"ssh://{SSH_USER}@127.0.0.1:{port}{home / path}")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        _kill_user_processes(SSH_USER)  # its sessions too
        subprocess.run(["userdel", SSH_USER], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


class TaskRuns(dict):
    """{stage: task run}, and ``stage_of``: every task run id of the flow run -> its stage
    (a stage's task run recorded twice still names its stage)."""

    stage_of: dict


def prefect_task_runs(flow_run_id, api_url=None):
    """{task name: task run} of one flow run, and the flow run's artifacts, from the Prefect API
    (this process's, or the server at ``api_url``)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    # Prefect 3 records task-run states from events, asynchronously: right after the flow
    # returns, a retried task can still read as "AwaitingRetry" or "Running". Wait (bounded)
    # until the server has every task run in a final state.
    async def read():
        async with get_client() as client:
            for _ in range(120):
                runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
                if runs and all(r.state is not None and r.state.is_final() for r in runs):
                    break
                await asyncio.sleep(0.25)
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            found = TaskRuns({r.name.rsplit("-", 1)[0].removeprefix("dvc-"): r for r in runs})
            found.stage_of = {r.id: r.name.rsplit("-", 1)[0].removeprefix("dvc-") for r in runs}
            return found, artifacts

    if api_url is None:
        return asyncio.run(read())
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())
