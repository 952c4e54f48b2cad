"""Prefect and MLflow servers as background services of a project.

``graft server start`` launches each server (on 127.0.0.1 unless graft.yaml says
``servers.<name>.host``) in its own process group, with
its pid, URL and log under ``.graft/servers/``, and waits for its health check;
``stop`` ends the whole process group (workers included), so nothing is left behind.

A server that other machines can reach asks for credentials, with each server's own
mechanism: MLflow's basic-auth app (users, and permissions per experiment and registered
model) and Prefect's server auth string. Loopback needs none unless ``servers.auth`` says
so. Credentials reach the servers through their environment, never their command line
(``ps`` shows every user the command lines), and the state files hold no secret.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from graft.base import fsio, processes, secrets
from graft.base.errors import GraftError
from graft.config import project
from graft.config.project import MlflowServer, PrefectServer
from graft.tracking import runs as tracking

STATE_DIR = Path(".graft") / "servers"
NAMES = ("prefect", "mlflow")


LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_KEYS = {"prefect": ("PREFECT_SERVER_API_AUTH_STRING",),
             "mlflow": ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")}  # fmt: skip


def server_config(root: Path, host: str | None = None) -> tuple[PrefectServer, MlflowServer]:
    """Both servers' settings; ``host`` (``graft server start --host``) overrides both."""
    servers = project.load(root).servers
    prefect, mlflow_ = servers.prefect, servers.mlflow
    if host:
        prefect, mlflow_ = replace(prefect, host=host), replace(mlflow_, host=host)
    return prefect, mlflow_


def auth_required(root: Path, prefect: PrefectServer, mlflow_: MlflowServer) -> bool:
    """Credentials are asked whenever a server listens beyond this machine, or when
    ``servers.auth`` is true (loopback shared by several users, or a reverse proxy)."""
    return project.load(root).servers.auth or prefect.host not in LOOPBACK or mlflow_.host not in LOOPBACK


def check_auth(root: Path, prefect: PrefectServer, mlflow_: MlflowServer) -> dict[str, str]:
    """The servers' credentials when authentication is required (empty when not); refuse
    to go on, saying how, when some are missing."""
    if not auth_required(root, prefect, mlflow_):
        return {}
    creds = secrets.resolved(root)
    missing = [k for keys in AUTH_KEYS.values() for k in keys if k not in creds]
    if missing:
        where = ", ".join(f"servers.{n}.host is {s.host}" for n, s in (("prefect", prefect), ("mlflow", mlflow_))
                          if s.host not in LOOPBACK) or "servers.auth is true"  # fmt: skip
        raise GraftError(f"refusing to start the servers without authentication ({where}: anyone who reaches the "
                         f"port could read every run and move the champion). Missing: {', '.join(missing)}. "
                         "`graft server init-auth` generates them into .graft/secrets.yaml (mode 0600); or set them in "
                         "the environment. Then add users with `graft server user add NAME --permission READ|EDIT|MANAGE`.")  # fmt: skip
    return creds


def store_uri(root: Path, mlflow_: MlflowServer) -> str:
    """The MLflow server's store: MLFLOW_BACKEND_STORE_URI (environment or secrets file:
    it may hold a password), else graft.yaml's, else the project's SQLite file."""
    return secrets.get(root, "MLFLOW_BACKEND_STORE_URI") or mlflow_.backend_store_uri or tracking.default_tracking_uri(root)


def public_host(host: str) -> str:
    """The address other machines use for a server listening on ``host``: itself, or for
    every interface (0.0.0.0, ::) this machine's address on its default route (a private
    IP, which MLflow's DNS-rebinding guard accepts by default)."""

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


def commands(root: Path, prefect: PrefectServer, mlflow_: MlflowServer, creds: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """How each server is started, where its API is, and how to ask it if it is up.
    ``creds`` (from :func:`check_auth`): start them with authentication."""
    creds = creds or {}
    bin_dir = Path(sys.executable).parent
    store = store_uri(root, mlflow_)
    p_url, m_url = (f"http://{public_host(prefect.host)}:{prefect.port}", f"http://{public_host(mlflow_.host)}:{mlflow_.port}")
    specs = {
        "prefect": {
            "cmd": [str(bin_dir / "prefect"), "server", "start", "--host", prefect.host, "--port", str(prefect.port)],
            # The server's own database lives in the project, not in ~/.prefect.
            # The UI's own API address defaults to port 4200 whatever --port says: without
            # PREFECT_UI_API_URL the pages of a server on another port show nothing. One set
            # by the user wins (the public https URL of a TLS proxy in front).
            "env": {"PREFECT_HOME": str(prefect_home(root)), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_URL": "", "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or f"{p_url}/api"},  # fmt: skip
            "url": f"{p_url}/api",
            "health": f"{p_url}/api/health",  # answered without credentials (Prefect's own exemption)
        },
        "mlflow": {
            "cmd": [sys.executable, "-m", "mlflow", "server", "--host", mlflow_.host, "--port", str(mlflow_.port),
                    "--artifacts-destination", str(root / "mlruns" / "artifacts"),
                    "--workers", "1", *_allowed_hosts(mlflow_)],  # fmt: skip
            # No background job runner: start-up drops from about 16 s to about 4 s. The store
            # goes through MLflow's own variable: on the command line `ps` would show its password.
            "env": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": store},
            "url": m_url,
            "health": f"{m_url}/health",  # unprotected in MLflow's auth app too
            "store": secrets.mask_url(store),
        },
    }
    if creds:
        specs["prefect"]["env"]["PREFECT_SERVER_API_AUTH_STRING"] = creds["PREFECT_SERVER_API_AUTH_STRING"]
        specs["mlflow"]["cmd"] += ["--app-name", "basic-auth"]
        specs["mlflow"]["env"].update({
            "MLFLOW_AUTH_CONFIG_PATH": str(_auth_config(root, mlflow_)),
            "MLFLOW_AUTH_ADMIN_PASSWORD": creds["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        })
    return specs


def _auth_config(root: Path, mlflow_: MlflowServer) -> Path:
    """MLflow's auth settings file (no secret in it: the admin password comes through the
    environment). Its users and grants live in a SQLite file beside it, on this machine."""
    folder = root / ".graft" / "mlflow"
    path = folder / "basic_auth.ini"
    fsio.write_text(path, "\n".join([
        "[mlflow]",
        f"default_permission = {mlflow_.default_permission}",
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}",
        f"admin_username = {os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME') or secrets.ADMIN_USER}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        # Each request otherwise re-derives the password's PBKDF2 hash. With one worker the
        # cache is never stale: a password change through the API clears it there.
        "auth_cache_ttl_seconds = 60",
    ]) + "\n")  # fmt: skip
    return path


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


def start(root: Path, timeout: float = 90.0, host: str | None = None) -> dict[str, dict[str, Any]]:
    """Start whichever server is not running yet; wait until both answer their health checks.
    ``host`` overrides graft.yaml's for both; beyond loopback they need credentials."""
    root = root.resolve()
    prefect, mlflow_ = server_config(root, host)
    creds = check_auth(root, prefect, mlflow_)
    specs = commands(root, prefect, mlflow_, creds)
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    if specs["mlflow"]["store"].startswith("sqlite:///"):
        Path(specs["mlflow"]["store"].removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    started = {}
    for name in NAMES:
        current = status(root)[name]
        spec = specs[name]
        if current["running"]:
            if current["url"] != spec["url"] or current.get("auth", False) != bool(creds):
                # Never leave a server running without credentials that should now ask for them.
                raise GraftError(f"the {name} server already runs at {current['url']} "
                                 f"({'with' if current.get('auth') else 'without'} credentials), not as graft.yaml and "
                                 "--host now ask; `graft server stop` first, then start it again")  # fmt: skip
            started[name] = current
            continue
        if current.get("pid") and _alive(current["pid"]):
            kill_group(current["pid"])
        if healthy(spec["health"], timeout=1.0):
            raise GraftError(f"port of {spec['url']} is already served by another process; change servers.{name}.port in graft.yaml")
        log_path = root / STATE_DIR / f"{name}.log"
        env = {**os.environ, **spec["env"]}
        env = {k: v for k, v in env.items() if v != ""}  # "" unsets (a client's PREFECT_API_URL)
        with open(log_path, "ab") as log:  # the server keeps its own descriptor
            proc = subprocess.Popen(spec["cmd"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        state = {"pid": proc.pid, "url": spec["url"], "health": spec["health"], "log": str(log_path),
                 "started": time.time(), "auth": bool(creds), **({"store": spec["store"]} if "store" in spec else {})}  # fmt: skip
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

    procs = []
    for pid in group_members(pgid):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    processes.terminate(procs, grace)


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


CLIENT_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
# One project, one Prefect history: Prefect's temporary server (a run with no servers up)
# writes to the database `graft server start` serves, not to ~/.prefect shared by every
# project on the machine. A database the user points Prefect at wins.
DB_KEYS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def prefect_home(root: Path) -> Path:
    """The project's Prefect home: the server's database (prefect.db) and its settings."""
    return root.resolve() / ".graft" / "prefect"


def project_tag(root: Path) -> str:
    """The Prefect tag on every run of this project's flows: two projects' runs never mix."""
    return f"project:{root.resolve().name}"


def client_env(root: Path) -> dict[str, str]:
    """PREFECT_API_URL and MLFLOW_TRACKING_URI of the running servers (none if none run),
    and this machine's client credentials where it has some (a teammate's servers too)."""
    root = root.resolve()
    env = {}
    st = status(root)
    if st["prefect"]["running"]:
        env["PREFECT_API_URL"] = st["prefect"]["url"]
    elif not any(os.environ.get(k) for k in ("PREFECT_API_URL", *DB_KEYS)):
        prefect_home(root).mkdir(parents=True, exist_ok=True)
        env[DB_KEYS[0]] = f"sqlite+aiosqlite:///{prefect_home(root) / 'prefect.db'}"
    if st["mlflow"]["running"]:
        env["MLFLOW_TRACKING_URI"] = st["mlflow"]["url"]
    creds = secrets.resolved(root)
    env.update({k: creds[k] for k in CLIENT_KEYS if k in creds})
    return env


# --- users of the MLflow server (its basic-auth app), managed as its admin ---------------


def prefect_refused_message(exc: BaseException) -> str | None:
    """A message for a person when ``exc`` means the Prefect server refused this client
    (401/403: a missing or wrong auth string); None otherwise. As for MLflow's refusal
    (:func:`graft.tracking.runs.refused_message`), retrying does not help: the setting does."""
    import httpx  # Prefect's HTTP client (a dependency of Prefect's): imported where a refusal is read

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, httpx.HTTPStatusError) and e.response.status_code in (401, 403):
            url = secrets.mask_url(str(e.request.url).split("/api/", 1)[0] + "/api")
            given = os.environ.get("PREFECT_API_AUTH_STRING")
            what = "the PREFECT_API_AUTH_STRING it was given" if given else "a request without PREFECT_API_AUTH_STRING"
            return (f"the Prefect server at {url} refused {what} ({e.response.status_code}): set PREFECT_API_AUTH_STRING "
                    "to the server's user:password (PREFECT_SERVER_API_AUTH_STRING in the server's .graft/secrets.yaml), "
                    "in the environment or in this project's .graft/secrets.yaml")  # fmt: skip
        e = e.__cause__ or e.__context__
    return None


def admin_client(root: Path):
    """MLflow's user-management client for the project's server, as its admin (the
    password from the environment or the secrets file, never from an argument)."""
    url = client_env(root).get("MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not url.startswith(("http://", "https://")):
        raise GraftError("no MLflow server to manage users on: start one with `graft server start` (or set "
                         "MLFLOW_TRACKING_URI)")  # fmt: skip
    password = secrets.get(root, "MLFLOW_AUTH_ADMIN_PASSWORD")
    if not password:
        raise GraftError("managing users needs the admin's password: MLFLOW_AUTH_ADMIN_PASSWORD in the environment or "
                         "in .graft/secrets.yaml (on the servers' machine: `graft server init-auth`)")  # fmt: skip
    os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or secrets.ADMIN_USER
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    os.environ["MLFLOW_TRACKING_URI"] = url
    import warnings

    with warnings.catch_warnings():  # its import pulls MLflow's server app, whose Starlette WSGI shim warns: not ours to fix
        warnings.filterwarnings("ignore", message=r"starlette\.middleware\.wsgi is deprecated")
        from mlflow.server.auth.client import AuthServiceClient  # MLflow's own admin client, only for this command

    return AuthServiceClient(url)


def grant_project(root: Path, auth, client, name: str, username: str, permission: str) -> list[str]:
    """``permission`` for ``username`` on the project's experiment and registered model
    ``name`` (created here, as the admin, when they do not exist yet); what was granted."""
    experiment_id = tracking.configure(root)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description="Registered by graft's register stage.")
    granted = []
    for kind, resource in (("experiment", experiment_id), ("registered_model", name)):
        auth.grant_user_permission(username, kind, resource, permission)
        granted.append(f"{kind} {tracking.experiment_name() if kind == 'experiment' else name}")
    return granted
