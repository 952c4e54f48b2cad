"""Prefect and MLflow servers as background services of a project.

``graft server start`` launches each server (on 127.0.0.1 unless graft.yaml says
``servers.<name>.host``) in its own process group, with
its pid, URL and log under ``.graft/servers/``, and waits for its health check;
``stop`` ends the whole process group (workers included), so nothing is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import read_config
from stages.common import GraftError
from stages.config import parse

STATE_DIR = Path(".graft") / "servers"
NAMES = ("prefect", "mlflow")


@dataclass(frozen=True)
class PrefectServer:
    port: int = 4200
    host: str = "127.0.0.1"  # the address it listens on; 0.0.0.0: every interface (other machines)


@dataclass(frozen=True)
class MlflowServer:
    port: int = 5000
    host: str = "127.0.0.1"
    backend_store_uri: str | None = None  # null: the project's SQLite file


def server_config(root: Path) -> tuple[PrefectServer, MlflowServer]:
    section = read_config(root).get("servers", {}) or {}
    return (parse(PrefectServer, section.get("prefect") or {}, "servers.prefect"),
            parse(MlflowServer, section.get("mlflow") or {}, "servers.mlflow"))  # fmt: skip


def public_host(host: str) -> str:
    """The address other machines use for a server listening on ``host``: itself, or for
    every interface (0.0.0.0, ::) this machine's address on its default route (a private
    IP, which MLflow's DNS-rebinding guard accepts by default)."""
    import socket

    if host not in ("0.0.0.0", "::", ""):
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))  # no packet is sent: this only picks the interface
            return s.getsockname()[0]
        except OSError:
            return socket.gethostname()


def _state_file(root: Path, name: str) -> Path:
    return root / STATE_DIR / f"{name}.json"


def _alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie, not yet reaped, counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def commands(root: Path, prefect: PrefectServer, mlflow_: MlflowServer) -> dict[str, dict[str, Any]]:
    """How each server is started, where its API is, and how to ask it if it is up."""
    from stages import tracking

    bin_dir = Path(sys.executable).parent
    store = mlflow_.backend_store_uri or tracking.default_tracking_uri(root)
    p_url, m_url = (f"http://{public_host(prefect.host)}:{prefect.port}", f"http://{public_host(mlflow_.host)}:{mlflow_.port}")
    return {
        "prefect": {
            "cmd": [str(bin_dir / "prefect"), "server", "start", "--host", prefect.host, "--port", str(prefect.port)],
            # The server's own database lives in the project, not in ~/.prefect.
            # The UI's own API address defaults to port 4200 whatever --port says: without
            # PREFECT_UI_API_URL the pages of a server on another port show nothing.
            "env": {"PREFECT_HOME": str(root / ".graft" / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_URL": "", "PREFECT_UI_API_URL": f"{p_url}/api"},  # fmt: skip
            "url": f"{p_url}/api",
            "health": f"{p_url}/api/health",
        },
        "mlflow": {
            "cmd": [sys.executable, "-m", "mlflow", "server", "--host", mlflow_.host, "--port", str(mlflow_.port),
                    "--backend-store-uri", store, "--artifacts-destination", str(root / "mlruns" / "artifacts"),
                    "--workers", "1", *_allowed_hosts(mlflow_)],  # fmt: skip
            # No background job runner: start-up drops from about 16 s to about 4 s.
            "env": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            "url": m_url,
            "health": f"{m_url}/health",
            "store": store,
        },
    }


def _allowed_hosts(server: MlflowServer) -> list[str]:
    """MLflow answers only requests whose Host header it trusts (its guard against DNS
    rebinding): on a shared host, the name other machines use, beside the loopback ones."""
    if server.host in ("127.0.0.1", "localhost"):
        return []  # MLflow's default (localhost and private addresses) covers it
    names = {public_host(server.host), server.host, "localhost", "127.0.0.1"} - {"0.0.0.0", "::", ""}
    return ["--allowed-hosts", ",".join(sorted(f"{n}{p}" for n in names for p in ("", f":{server.port}")))]


def ui_url(state: dict[str, Any]) -> str:
    """The page a person opens: Prefect's UI is its API URL without ``/api``; MLflow's is the server's root."""
    return state["url"].removesuffix("/api")


def read_state(root: Path, name: str) -> dict[str, Any] | None:
    path = _state_file(root, name)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def status(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in NAMES:
        st = read_state(root, name)
        if st is None:
            out[name] = {"running": False}
        else:
            out[name] = {**st, "running": _alive(st["pid"]) and healthy(st["health"])}
    return out


def start(root: Path, timeout: float = 90.0) -> dict[str, dict[str, Any]]:
    """Start whichever server is not running yet; wait until both answer their health checks."""
    from stages import fsio

    root = root.resolve()
    prefect, mlflow_ = server_config(root)
    specs = commands(root, prefect, mlflow_)
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    if specs["mlflow"]["store"].startswith("sqlite:///"):
        Path(specs["mlflow"]["store"].removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    started = {}
    for name in NAMES:
        current = status(root)[name]
        if current["running"]:
            started[name] = current
            continue
        if current.get("pid") and _alive(current["pid"]):
            kill_group(current["pid"])
        spec = specs[name]
        if healthy(spec["health"], timeout=1.0):
            raise GraftError(f"port of {spec['url']} is already served by another process; change servers.{name}.port in graft.yaml")
        log_path = root / STATE_DIR / f"{name}.log"
        env = {**os.environ, **spec["env"]}
        env = {k: v for k, v in env.items() if v != ""}  # "" unsets (a client's PREFECT_API_URL)
        with open(log_path, "ab") as log:  # the server keeps its own descriptor
            proc = subprocess.Popen(spec["cmd"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        state = {"pid": proc.pid, "url": spec["url"], "health": spec["health"], "log": str(log_path),
                 "started": time.time(), **({"store": spec["store"]} if "store" in spec else {})}  # fmt: skip
        fsio.write_json(_state_file(root, name), state)
        started[name] = state
    deadline = time.monotonic() + timeout
    for name, st in started.items():
        while not healthy(st["health"]):
            if not _alive(st["pid"]):
                raise GraftError(f"the {name} server exited during start-up; see its log: {st['log']}")
            if time.monotonic() > deadline:
                stop(root)
                raise GraftError(f"the {name} server did not answer {st['health']} within {timeout:.0f}s; log: {st['log']}")
            time.sleep(0.5)
        st["running"] = True
    return started


def group_members(pgid: int) -> list[int]:
    """Processes still alive in the process group ``pgid`` (for checks and tests)."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def kill_group(pgid: int, grace: float = 15.0) -> None:
    """SIGTERM every process of the group ``pgid``, then SIGKILL what is left after
    ``grace`` seconds; reaps our own children among them."""
    import psutil

    procs = []
    for pid in group_members(pgid):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def stop(root: Path) -> list[str]:
    """Stop both servers and their worker processes; return the names that were running."""
    stopped = []
    for name in NAMES:
        st = read_state(root.resolve(), name)
        if st is None:
            continue
        if _alive(st["pid"]) or group_members(st["pid"]):
            kill_group(st["pid"])
            stopped.append(name)
        _state_file(root.resolve(), name).unlink(missing_ok=True)
    return stopped


def client_env(root: Path) -> dict[str, str]:
    """PREFECT_API_URL and MLFLOW_TRACKING_URI of the running servers (empty if none)."""
    env = {}
    st = status(root.resolve())
    if st["prefect"]["running"]:
        env["PREFECT_API_URL"] = st["prefect"]["url"]
    if st["mlflow"]["running"]:
        env["MLFLOW_TRACKING_URI"] = st["mlflow"]["url"]
    return env
