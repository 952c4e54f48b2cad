"""A ``graft run`` with nothing to do, recorded in Prefect without its engine.

When DVC's status finds every stage up to date, the training flow only marks each stage
Cached. Importing Prefect and running its flow engine for that costs about 4 s on 2
cores, against 1.5 s for ``dvc repro``'s own no-op. This module asks DVC the same
question first and, when the answer is "nothing", writes the same record through the
Prefect server's REST API: a ``graft-training`` flow run with one Completed/Cached task
run per stage (DVC's edges as their ``wait_for`` inputs, as the flow draws them), the
run's log line and its summary artifact. It does what the flow does around the stages
too: holds the project's lock, accepts the source's fingerprint, pushes to the DVC
remote when there is one.

With no server named, Prefect's client would start its temporary server for the flow;
this module starts the same one itself (same command, same database under PREFECT_HOME)
as it asks DVC, so the server's start-up overlaps DVC's answer and is the only cost over
``dvc repro``, not that plus Prefect's import and engine. When a stage is stale the
server is stopped and the flow runs as it would have.

It answers only when that is safe; ``None`` sends the caller through the full flow:
parameters to write, Prefect settings this module does not read (TLS, custom headers, an
API or profile named in a settings file), another run holding the lock, a stale stage,
or any answer from the server other than the expected one (a flow run already created is
then deleted, so a run is never recorded twice).

A run killed while it writes (``kill -9``) leaves its flow run Running, and, unlike the
flow's, with no heartbeat for Prefect to notice. It held the project's lock meanwhile, so
the next run here that takes the lock knows it is dead and marks it Crashed.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import importlib.util
import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows import remote
from flows.fingerprint import fingerprint, record_accepted
from flows.pipeline import Pipeline, ProjectLock, plan, read_summary, summary_markdown
from graft.base.errors import fault_point

FLOW_NAME = "graft-training"  # the flow's name in flows/training.py: one history for both paths
TASK_KEY = "run_stage"  # the flow's task function: the UI groups the task runs by it
TAG = "graft-noop"  # on the flow runs written here, so a later run can find one left Running
# As Prefect's own client (its settings, same defaults): the server answers 503 when its
# SQLite database is busy with its own services' writes (that happens on 2 cores), 429 when
# rate-limited; those, and a connection reset after one good answer, are retried with
# exponential back-off and jitter instead of giving up the shortcut.
RETRY_CODES = {408, 429, 502, 503}
# Prefect client settings this module cannot honour with urllib: with one set, the flow runs.
UNSUPPORTED = ("PREFECT_API_SSL_CERT_FILE", "PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "PREFECT_CLIENT_CUSTOM_HEADERS")

log = logging.getLogger("graft.run")


class PrefectAPI:
    """The few calls of Prefect's REST API a cached run needs (auth as Prefect's client:
    the basic-auth string first, else the API key as a bearer token)."""

    backoff_s = 2.0  # the first retry's wait, doubled each time (Prefect's client: 2 ** try)

    def __init__(self, url: str, auth_string: str | None = None, api_key: str | None = None, timeout_s: float = 60.0,
                 max_retries: int = 5, jitter: float = 0.2):  # fmt: skip
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth_string:
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth_string.encode()).decode()
        elif api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s, self.max_retries, self.jitter = timeout_s, max_retries, jitter
        self._connected = False  # a refused first connection is a wrong URL, not a hiccup: no retry

    @classmethod
    def from_env(cls, url: str | None = None) -> PrefectAPI | None:
        """The API named by PREFECT_API_URL (or at ``url``), with Prefect's client settings
        from the environment; None when there is none, or with a setting urllib cannot honour."""
        url = url or os.environ.get("PREFECT_API_URL")
        settings = client_settings()
        return cls(url, **settings) if url and settings is not None else None


    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
            wait = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                self._connected = True
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                self._connected = True
                if e.code not in RETRY_CODES or attempt == self.max_retries:
                    raise
                wait = _retry_after(e.headers.get("Retry-After"))
                reason: object = f"HTTP {e.code}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                if not self._connected or attempt == self.max_retries:
                    raise
                reason = getattr(e, "reason", e)
            if wait is None:
                wait = self.backoff_s * 2**attempt
                wait *= random.uniform(1 - self.jitter, 1 + self.jitter)
            log.debug("Prefect's API: %s %s answered %s; again in %.1f s", method, path, reason, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def set_state(self, kind: str, run_id: str, state: dict[str, Any]) -> None:
        answer = self.call("POST", f"/{kind}/{run_id}/set_state", {"state": state})
        if (answer or {}).get("status") != "ACCEPT":
            raise ValueError(f"Prefect refused the state {state['type']} for {kind} {run_id}: {answer}")


def client_settings() -> dict[str, Any] | None:
    """Prefect's client settings from the environment, as PrefectAPI takes them; None with
    one urllib cannot honour or a bad value (Prefect's own settings will name it)."""
    env = os.environ
    if any(env.get(k) for k in UNSUPPORTED):
        return None
    try:
        return dict(auth_string=env.get("PREFECT_API_AUTH_STRING"), api_key=env.get("PREFECT_API_KEY"),
                    timeout_s=float(env.get("PREFECT_API_REQUEST_TIMEOUT") or 60.0),
                    max_retries=int(env.get("PREFECT_CLIENT_MAX_RETRIES") or 5),
                    jitter=float(env.get("PREFECT_CLIENT_RETRY_JITTER_FACTOR") or 0.2))  # fmt: skip
    except ValueError:
        return None

FALSE = {"0", "false", "f", "no", "n", "off"}


def temporary_server_wanted(cwd: Path) -> bool:
    """Whether Prefect's client, in this process, would start its temporary server: no API
    named in the environment or the active profile, and ephemeral mode on (the default
    profile's). Settings files in the working directory (.env, prefect.toml, pyproject's
    [tool.prefect]) could name an API too; with one there, leave the question to Prefect."""
    env = os.environ
    if env.get("PREFECT_API_URL") or any((cwd / f).is_file() for f in (".env", "prefect.toml")):
        return False
    try:
        if "prefect" in tomllib.loads((cwd / "pyproject.toml").read_text()).get("tool", {}):
            return False
    except (OSError, tomllib.TOMLDecodeError):
        pass
    package = _prefect_package()
    if package is None:
        return False
    home = Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser()
    user_path = Path(env.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        default = tomllib.loads((package / "settings" / "profiles.toml").read_text())
        user = tomllib.loads(user_path.read_text()) if user_path.is_file() else {}
    except (OSError, tomllib.TOMLDecodeError):
        return False
    active = env.get("PREFECT_PROFILE") or user.get("active") or default.get("active")
    profile = {**default.get("profiles", {}).get(active, {}), **user.get("profiles", {}).get(active, {})}
    if any(k.startswith("PREFECT_API_") for k in profile):
        return False
    for key in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        value = env.get(key) or profile.get(key)
        if value is not None:
            return str(value).strip().lower() not in FALSE
    return False  # Prefect's own default: off


# How long Prefect's temporary server may take to answer (Prefect's own default: 20 s). It
# starts in about 7 s on an idle 2-core machine; on a busy one it took more than 20, and
# the run died with a traceback before any stage. `graft` sets this for Prefect too.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 90


class TemporaryServer:
    """Prefect's temporary server, started as its client starts one (prefect.server.api.
    server.SubprocessASGIServer: uvicorn on a free port of 8000-8999, the UI off, the
    database of this PREFECT_HOME). Its process starts at construction, so its start-up
    overlaps the caller's own work; :meth:`wait` returns its API URL once it answers its
    health check; :meth:`stop` stops it. Raises OSError when Prefect is missing or the
    server does not answer in time (Prefect's setting, :data:`STARTUP_TIMEOUT_S` unless set)."""

    def __init__(self, timeout_s: float | None = None):
        self.timeout_s = timeout_s or float(os.environ.get(STARTUP_TIMEOUT_ENV) or STARTUP_TIMEOUT_S)
        package = _prefect_package()
        if package is None:
            raise OSError("Prefect is not installed in this environment")
        self._site = package.parent
        self._env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._spawn()

    def _spawn(self) -> None:
        port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(self._site), "--factory",
                                      "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                                      "--log-level", "error", "--lifespan", "on"], env=self._env,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/api"

    def wait(self) -> str:
        """The API URL, once the server answers. The timeout counts from this call: the
        server had the caller's own work's time on top."""
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout_s
        while True:
            while self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                        if resp.status == 200:
                            log.info("Prefect's temporary server on %s (no graft servers running)", self.url)
                            return self.url
                except (OSError, http.client.HTTPException):
                    pass
                if time.monotonic() > deadline:
                    raise OSError(f"Prefect's temporary server did not answer within {self.timeout_s:.0f} s")
                time.sleep(0.1)
            if time.monotonic() > deadline:  # it exited: its port was taken meanwhile
                raise OSError(f"Prefect's temporary server did not start within {self.timeout_s:.0f} s")
            self._spawn()

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``. uvicorn defers a SIGTERM that arrives
        during its start-up (database migrations included) until the start-up is done."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def temporary_server(timeout_s: float | None = None) -> Iterator[str]:
    """Prefect's temporary server (:class:`TemporaryServer`) for the block: yields its API
    URL once it answers, stops it on exit."""
    server = TemporaryServer(timeout_s)
    try:
        yield server.wait()
    finally:
        server.stop()


def _prefect_package() -> Path | None:
    """Where the prefect package is, found without importing it."""
    spec = importlib.util.find_spec("prefect")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def _die_with_parent() -> None:
    """Run in the server's process before it execs: Linux sends it SIGTERM when the
    `graft run` that started it dies, by kill -9 too, where no ``finally`` runs."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    for _ in range(50):
        port = random.randrange(8000, 9000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise OSError("no free port in 8000-8999 for Prefect's temporary server")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from Prefect; the back-off applies


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _record(api: PrefectAPI, root: Path, graph: Pipeline, on_stages) -> tuple[str, str, dict[str, Any]]:
    """Create the flow run (Running), call ``on_stages(flow_run_id)`` for the work around
    the stages (it returns the summary), record each stage as a Cached task run, the log
    line and the summary artifact, then end the flow run Completed. Returns its id, name
    and the summary. A failure after the flow run exists deletes it, then re-raises."""
    flow_id = api.call("POST", "/flows/", {"name": FLOW_NAME})["id"]
    params = {"project_dir": str(root), "overrides": [], "concurrency": "wait", "wait_timeout": None}
    # The idempotency key makes a retried create (its answer lost to a reset) return the
    # same flow run instead of a second one.
    run = api.call("POST", "/flow_runs/", {"flow_id": flow_id, "parameters": params, "tags": [TAG],
                                          "idempotency_key": f"graft-noop-{uuid.uuid4()}",
                                          "state": {"type": "RUNNING", "name": "Running"}})  # fmt: skip
    run_id = run["id"]
    fault_point("noop_after_flow_run_created")
    try:
        summary = on_stages(run_id)
        ids: dict[str, str] = {}
        for i, stage in enumerate(graph.order):
            message = f"DVC: stage '{stage}' unchanged, skipped"
            task = api.call("POST", "/task_runs/", {
                "flow_run_id": run_id, "task_key": TASK_KEY, "dynamic_key": str(i), "name": f"dvc-{stage}-{i}",
                "task_inputs": {"wait_for": [{"input_type": "task_run", "id": ids[u]} for u in graph.upstream[stage]]},
                "state": {"type": "COMPLETED", "name": "Cached", "message": message},
            })  # fmt: skip
            ids[stage] = task["id"]
        api.call("POST", "/logs/", [{"name": "prefect.flow_runs", "level": logging.INFO, "timestamp": _now(), "flow_run_id": run_id,
                                     "message": "DVC: every stage is up to date; nothing to run (recorded by graft "
                                                "without the flow engine)"}])  # fmt: skip
        api.call("POST", "/artifacts/", {"key": "graft-run-summary", "type": "markdown", "flow_run_id": run_id,
                                         "data": summary_markdown(summary, None), "description": f"graft run of {root}"})  # fmt: skip
        api.set_state("flow_runs", run_id, {"type": "COMPLETED", "name": "Completed",
                                            "message": "every stage up to date (DVC)"})  # fmt: skip
    except BaseException:
        try:
            api.call("DELETE", f"/flow_runs/{run_id}")
        except (OSError, ValueError):
            pass
        raise
    return run_id, run.get("name", ""), summary


def end_dead_runs(api: PrefectAPI, root: Path) -> list[str]:
    """Mark Crashed this project's flow runs written here and still Running: the caller
    holds the project's lock, which their writer held until it died. Returns their ids."""
    found = api.call("POST", "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [TAG]}, "state": {"type": {"any_": ["RUNNING"]}}},
                                                   "limit": 200})  # fmt: skip
    dead = [r["id"] for r in found if (r.get("parameters") or {}).get("project_dir") == str(root)]
    for run_id in dead:
        api.set_state("flow_runs", run_id, {"type": "CRASHED", "name": "Crashed",
                                            "message": "the graft run writing it was killed before it finished "
                                                       "(found by a later run of the project)"})  # fmt: skip
        log.warning("Prefect flow run %s was left Running by a killed graft run: marked Crashed", run_id)
    return dead


def flow_run_url(run_id: str) -> str:
    """The flow run's page in the UI of a self-hosted Prefect server (the UI at the root,
    the API under /api); elsewhere (Prefect Cloud) the id alone."""
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    return f"{api.removesuffix('/api')}/runs/flow-run/{run_id}" if api.endswith("/api") else f"id {run_id}"


def try_run(root: Path) -> dict[str, Any] | None:
    """The run's summary (as the flow returns it) when nothing is stale and Prefect took
    the record; None when the full flow must run (see the module's docstring)."""
    api = PrefectAPI.from_env()
    # No server named: Prefect would start its temporary server; so does this, once DVC
    # has said there is nothing to run (the flow would start its own otherwise).
    temporary = api is None and client_settings() is not None and temporary_server_wanted(Path.cwd())
    if api is None and not temporary:
        return None
    lock = ProjectLock(root)
    if not lock.acquire(wait=False):
        return None  # the flow waits for it, or skips, as --concurrency says
    server = None
    try:
        if temporary:
            # Started before DVC's plan, so its start-up overlaps the plan and the source's
            # fingerprint (1.1 s here); stopped below if a stage turns out stale.
            try:
                server = TemporaryServer()
            except OSError as e:
                log.warning("graft run: Prefect's temporary server did not start (%s): running the flow instead", e)
                return None
        if api is not None:
            try:
                end_dead_runs(api, root)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("graft run: Prefect's API did not answer as expected (%s): running the flow instead", e)
                return None
        graph, stale = plan(root)
        if stale:
            return None
        source = fingerprint(root)

        def around_stages(run_id: str) -> dict[str, Any]:
            summary = read_summary(root, {s: "cached" for s in graph.order})
            summary.update(flow_run_id=run_id, mlflow_parent_run_id=None, tracking_uri=None)
            summary["remote"] = remote.push(root, log, run_id=run_id)
            return summary

        try:
            if api is not None:
                run_id, name, summary = _record(api, root, graph, around_stages)
            else:
                assert server is not None
                api = PrefectAPI.from_env(server.wait())
                assert api is not None  # the same settings were read above
                end_dead_runs(api, root)
                run_id, name, summary = _record(api, root, graph, around_stages)
        except (OSError, ValueError, KeyError, TypeError) as e:  # urllib's errors are OSErrors
            log.warning("graft run: recording the no-op run in Prefect failed (%s): running the flow instead", e)
            return None
        record_accepted(root, source)
        summary["flow_run_name"] = name
        return summary
    finally:
        if server is not None:
            # Stale: the flow starts its own. Time for a first start's migrations to end.
            server.stop(grace_s=30.0)
        lock.release()
