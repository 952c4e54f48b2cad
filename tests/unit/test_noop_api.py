"""flows/noop.py's REST calls retry as Prefect's own client does: on 503 (the server's
SQLite busy with its own writes), 429, 502, 408 and on a connection lost after a first
answer; never on other errors, nor on a first connection refused (a wrong URL). Served
by a real HTTP server on 127.0.0.1 that answers from a script."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows import noop


@pytest.fixture
def scripted():
    """A server answering each request with the next (status, headers) of ``script``
    (200 with a JSON body once the script runs out); ``seen`` lists the requests."""
    state = {"script": [], "seen": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state["seen"].append((self.path, json.loads(body) if body else None))
            status, headers = state["script"].pop(0) if state["script"] else (200, {})
            if status == "drop":  # close the connection without an answer
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            payload = json.dumps({"ok": len(state["seen"])}).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/api"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(noop.time, "sleep", waited.append)
    return waited


def test_busy_server_answers_are_retried_with_jittered_backoff(scripted, sleeps):
    scripted["script"] = [(503, {}), (503, {}), (429, {"Retry-After": "7"})]
    api = noop.PrefectAPI(scripted["url"], max_retries=5, jitter=0.2)
    assert api.call("POST", "/flow_runs/", {"x": 1}) == {"ok": 4}
    assert [p for p, _ in scripted["seen"]] == ["/api/flow_runs/"] * 4
    assert all(b == {"x": 1} for _, b in scripted["seen"])  # the same body each time
    assert 1.6 <= sleeps[0] <= 2.4 and 3.2 <= sleeps[1] <= 4.8  # 2 ** try, +-20 %
    assert sleeps[2] == 7.0  # the server's Retry-After wins


def test_other_errors_and_the_last_retry_are_raised(scripted, sleeps):
    scripted["script"] = [(500, {})]
    api = noop.PrefectAPI(scripted["url"], max_retries=5)
    with pytest.raises(urllib.error.HTTPError) as e:
        api.call("POST", "/task_runs/", {})
    assert e.value.code == 500 and len(scripted["seen"]) == 1 and sleeps == []

    scripted["script"] = [(503, {"Retry-After": "0"})] * 5
    scripted["seen"].clear()
    with pytest.raises(urllib.error.HTTPError) as e:
        noop.PrefectAPI(scripted["url"], max_retries=2).call("POST", "/logs/", [])
    assert e.value.code == 503 and len(scripted["seen"]) == 3  # one try and two retries


def test_a_dropped_connection_is_retried_only_after_a_first_answer(scripted, sleeps):
    api = noop.PrefectAPI(scripted["url"], max_retries=3)
    scripted["script"] = [("drop", {})]
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        api.call("POST", "/flows/", {"name": "f"})  # never connected: maybe the wrong URL
    assert sleeps == []

    assert api.call("POST", "/flows/", {"name": "f"}) == {"ok": 2}
    scripted["script"] = [("drop", {})]
    assert api.call("POST", "/flows/", {"name": "f"}) == {"ok": 4}  # dropped once, then answered
    assert len(sleeps) == 1


def test_settings_come_from_prefects_environment_variables(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.setenv("PREFECT_API_REQUEST_TIMEOUT", "12.5")
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "0")
    api = noop.PrefectAPI.from_env()
    assert api is not None and api.timeout_s == 12.5 and api.max_retries == 0
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "many")
    assert noop.PrefectAPI.from_env() is None  # the flow runs, and Prefect names the bad setting


def test_a_stale_stage_stops_the_server_started_alongside_dvcs_answer(tmp_path, monkeypatch):
    """Without servers, Prefect's temporary server starts as DVC is asked (so its start-up
    overlaps the answer); when a stage is stale the shortcut steps aside for the flow and
    the server it started is stopped, not left running. A real DVC project, a real server."""
    import subprocess
    import sys
    from pathlib import Path

    import psutil

    project = tmp_path / "project"
    project.mkdir()
    (project / "input.txt").write_text("1\n")
    (project / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp input.txt output.txt\n    deps: [input.txt]\n    outs: [output.txt]\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    for k in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.chdir(project)
    started = []

    class Spy(noop.TemporaryServer):  # the real server, its process remembered
        def _spawn(self):
            super()._spawn()
            started.append(psutil.Process(self.proc.pid))

    monkeypatch.setattr(noop, "TemporaryServer", Spy)
    assert noop.try_run(Path(project)) is None  # stale: the flow must run
    assert started, "no temporary server was started alongside DVC's answer"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started)
    lock = noop.ProjectLock(project)
    assert lock.acquire(wait=False), "the project's lock was kept"
    lock.release()


def test_what_a_no_op_run_does_before_the_server_starts_imports_no_pandas():
    """`graft run` parses every stage's params and checks the source before Prefect's
    temporary server can start; pandas (0.3 s to import here) must not come with that."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import flows.cli, flows.noop, flows.services, flows.remote, flows.fingerprint\n"
        "from graft.config.params import read_params, section\n"
        "from graft.overrides import apply_overrides\n"
        "from graft.config.params import IngestParams\n"
        "from graft.data.snapshot import check_source\n"
        "root = Path(sys.argv[1])\n"
        "params = apply_overrides(read_params(root / 'params.yaml'), [])  # as `graft run`: every section parsed\n"
        "check_source(section(IngestParams, params, 'ingest'), root)\n"
        "print(sorted(m for m in ('pandas', 'torch', 'prefect', 'mlflow') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
