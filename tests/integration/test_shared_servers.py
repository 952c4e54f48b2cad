"""Servers a team can share: with credentials required (as beyond loopback; bound to
127.0.0.1 here), both APIs refuse a request without them, `graft run` with them goes end
to end on an MLflow store in PostgreSQL, a read-only user cannot move the champion, and
no secret (the database password, the webhook URL, the servers' own credentials, a
user's password) shows up in a command line, a file of the project, a server log, the
MLflow store or Prefect's records. One pipeline run serves every test of the module."""

import base64
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import copy_project, make_image_folder, project_env, set_params
from tests.integration.test_services import free_port, set_config

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PG_BIN, reason="PostgreSQL server binaries not installed (make postgres)")]  # fmt: skip

TINY = dict(preprocess={"image_size": 32}, register={"min_accuracy": 0.0},
            fine_tune={"epochs": 1, "batch_size": 16, "mode": "partial", "frozen_groups": 4})  # fmt: skip
MODEL = "graft-classifier"


def as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the 'postgres' user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    """Debian's PostgreSQL on a free loopback port: TCP clients need a password (SCRAM),
    the superuser works through the cluster's own socket."""

    def __init__(self, base: Path):
        self.bin, self.base = Path(PG_BIN[-1]), base
        self.data, self.sock, self.port = base / "data", base / "sock", free_port()
        self.sock.mkdir(parents=True)
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            os.chmod(base, 0o755)
            for p in (base, self.sock):
                os.chown(p, pg.pw_uid, pg.pw_gid)
        subprocess.run(as_pg_user([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                                   "--auth-local=trust", "--auth-host=scram-sha-256"]), check=True, capture_output=True)  # fmt: skip
        subprocess.run(as_pg_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(base / "log"), "-w", "start",
                                   "-o", f"-h 127.0.0.1 -p {self.port} -k {self.sock}"]), check=True, capture_output=True)  # fmt: skip

    def sql(self, statement: str, db: str = "postgres") -> str:
        """Run SQL as the superuser; the statement goes through stdin, never argv."""
        out = subprocess.run(as_pg_user(["psql", "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", "-d", db,
                                         "-v", "ON_ERROR_STOP=1", "-tA", "-f", "-"]),
                             input=statement, capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()

    def dump(self, db: str) -> str:
        return subprocess.run(as_pg_user(["pg_dump", "-h", str(self.sock), "-p", str(self.port), "-U", "postgres", db]),
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    def stop(self) -> None:
        subprocess.run(as_pg_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]), capture_output=True)


class PsSampler:
    """`ps` as every user of the machine sees it, sampled until stopped."""

    def __init__(self, every: float = 0.5):
        self.samples: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout)
            self._stop.wait(every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def graft(project: Path, *args: str, env: dict | None = None, stdin: str | None = None, log: list | None = None):
    """A graft command in ``project``, on its running servers (found by graft itself)."""
    base = {k: v for k, v in project_env(project).items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--project", str(project)], cwd=project,
                         env={**base, **(env or {})}, input=stdin, capture_output=True, text=True, timeout=600)  # fmt: skip
    if log is not None:
        log.append(res.stdout + res.stderr)
    return res


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """Postgres with a password, both servers with credentials, two users, one `graft run`."""
    from flows import services
    from graft.base import secrets

    base = tmp_path_factory.mktemp("team")
    marks = SimpleNamespace(pg=f"pgpw{uuid.uuid4().hex}", hook=f"hookpath{uuid.uuid4().hex}",
                            carol=f"carolpw{uuid.uuid4().hex}", dave=f"davepw{uuid.uuid4().hex}",
                            erin=f"erinpw{uuid.uuid4().hex}")  # fmt: skip
    pg = Postgres(Path(tempfile.mkdtemp(prefix="graft-pg-")))
    ps, outputs = None, []
    project = copy_project(base / "project")
    try:
        pg.sql(f"CREATE ROLE graft LOGIN PASSWORD '{marks.pg}';")
        pg.sql("CREATE DATABASE mlflow OWNER graft;")
        images = make_image_folder(base / "images")
        set_params(project, ingest={"source": "imagefolder", "path": str(images), "max_train_per_class": None}, **TINY)
        set_config(project, servers={"auth": True, "prefect": {"port": free_port()}, "mlflow": {"port": free_port()}})
        ps = PsSampler()
        init = graft(project, "server", "init-auth", log=outputs)
        assert init.returncode == 0, init.stderr
        hook_url = f"http://127.0.0.1:{free_port()}/services/{marks.hook}"  # nothing listens: the webhook fails
        secrets.write_file(project, {"MLFLOW_BACKEND_STORE_URI": f"postgresql://graft:{marks.pg}@127.0.0.1:{pg.port}/mlflow",
                                     "GRAFT_WEBHOOK_URL": hook_url})  # fmt: skip
        started = graft(project, "server", "start", log=outputs)
        assert started.returncode == 0, started.stdout + started.stderr
        for user, permission, password in (("carol", "MANAGE", marks.carol), ("dave", "READ", marks.dave),
                                           ("erin", "EDIT", marks.erin)):
            added = graft(project, "server", "user", "add", user, "--permission", permission, "--password-stdin",
                          stdin=password + "\n", log=outputs)  # fmt: skip
            assert added.returncode == 0, added.stdout + added.stderr
        carol = {"MLFLOW_TRACKING_USERNAME": "carol", "MLFLOW_TRACKING_PASSWORD": marks.carol}
        run = graft(project, "run", env=carol, log=outputs)
        status = graft(project, "server", "status", log=outputs)
        creds = secrets.read_file(project)
        state = services.status(project)
        yield SimpleNamespace(images=images, project=project, pg=pg, ps=ps, marks=marks, run=run, outputs=outputs, status=status,
                              creds=creds, carol=carol, state=state, hook_url=hook_url,
                              dave={"MLFLOW_TRACKING_USERNAME": "dave", "MLFLOW_TRACKING_PASSWORD": marks.dave},
                              erin={"MLFLOW_TRACKING_USERNAME": "erin", "MLFLOW_TRACKING_PASSWORD": marks.erin})  # fmt: skip
    finally:
        services.stop(project)
        if ps is not None:
            ps.stop()
        pg.stop()
        shutil.rmtree(pg.base, ignore_errors=True)


def _request(url: str, auth: str | None = None, data: bytes | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_both_apis_refuse_requests_without_credentials(team):
    mlflow_url, prefect_url = team.state["mlflow"]["url"], team.state["prefect"]["url"]
    search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert _request(search) == 401
    assert _request(search, "carol:wrong-password") == 401
    assert _request(search, f"carol:{team.marks.carol}") == 200
    flows_filter = f"{prefect_url}/flows/filter"
    assert _request(flows_filter, data=b"{}") == 401
    assert _request(flows_filter, "graft:wrong", data=b"{}") == 401
    assert _request(flows_filter, team.creds["PREFECT_SERVER_API_AUTH_STRING"], data=b"{}") == 200
    # Health checks stay open (both servers' own choice): monitoring needs no secret.
    assert _request(team.state["mlflow"]["health"]) == 200 and _request(team.state["prefect"]["health"]) == 200
    assert "credentials required" in team.status.stdout
    # Running servers are never taken for ones with other settings: a start that would ask
    # for no credentials is refused, not answered with the authenticating servers (nor the reverse).
    import yaml

    config = team.project / "graft.yaml"
    original = config.read_text()
    cfg = yaml.safe_load(original)
    cfg["servers"]["auth"] = False
    config.write_text(yaml.safe_dump(cfg))
    try:
        again = graft(team.project, "server", "start", log=team.outputs)
    finally:
        config.write_text(original)
    assert again.returncode == 1 and "already runs at" in again.stderr and "(with credentials)" in again.stderr


def test_a_wrong_prefect_auth_string_is_one_line_naming_the_setting(team):
    """As a wrong MLflow password is: exit 2, the setting named, no traceback, nothing run."""
    res = graft(team.project, "run", env={**team.carol, "PREFECT_API_AUTH_STRING": "graft:wrong-password"},
                log=team.outputs)  # fmt: skip
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert "refused the PREFECT_API_AUTH_STRING it was given (401)" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "stages run" not in res.stdout, res.stderr[-3000:]
    assert "wrong-password" not in res.stdout + res.stderr  # a credential is never echoed


def test_run_with_credentials_registers_a_champion_in_postgres(team):
    assert team.run.returncode == 0, team.run.stdout[-3000:] + team.run.stderr[-3000:]
    assert "graft-classifier v1 is champion" in team.run.stdout
    status = graft(team.project, "status", env=team.carol, log=team.outputs)
    assert status.returncode == 0, status.stderr
    history = [line for line in status.stdout.splitlines() if " champion " in line and "v1" in line]
    assert history and " carol " in history[-1]  # the authenticated user, not the OS account
    # The registry lives in PostgreSQL, reached with the password from the secrets file.
    assert team.pg.sql("select count(*) from model_versions", db="mlflow") == "1"
    # The failing webhook was reported by its host only.
    assert "graft notification to http://127.0.0.1:" in team.run.stdout + team.run.stderr


def test_a_read_only_user_cannot_move_the_champion(team):
    import mlflow

    from graft.registry import rules as registry

    def registry_state():
        client = mlflow.MlflowClient(tracking_uri=team.state["mlflow"]["url"])
        aliases = client.get_registered_model(MODEL).aliases
        return aliases, registry.history(client, MODEL)

    os.environ.update(team.carol)
    try:
        before = registry_state()
        refused = [graft(team.project, *cmd, env=team.dave, log=team.outputs)
                   for cmd in (["promote", "1", "--force"], ["rollback"])]  # fmt: skip
        after = registry_state()
    finally:
        for key in team.carol:
            os.environ.pop(key, None)
    for res in refused:
        assert res.returncode == 1
        assert f"dave is not allowed to move the champion of {MODEL} (needs MANAGE, has READ)" in res.stderr
        assert "Traceback" not in res.stderr
    assert after == before and before[0] == {"champion": "1"}


def test_run_output_is_clean_and_a_register_rerun_logs_into_a_run_of_its_own(team):
    """`graft run` as a person reads it; then a user with EDIT (enough to run the pipeline)
    changes only register's params: fine_tune and evaluate come from DVC's cache, and the
    new version lands on a new MLflow run that links the run that trained the model, never
    on the old run."""
    import mlflow

    out = team.run.stdout + team.run.stderr
    assert "graft run: done" in out
    # One line per thing that happened: no DVC hints per stage, no progress-bar redraws,
    # no CloudPickle warning, no artifact download bars, no credential echoed.
    for noise in ("dvc push", "To track the changes with git", "%|", "cloudpickle", "CloudPickle", "Downloading artifacts",
                  "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):  # fmt: skip
        assert noise not in out, noise
    assert out.count("stages to run: ingest, validate, preprocess, load_pretrained, drift, teach, fine_tune, evaluate, register") == 1

    again = graft(team.project, "run", "--set", "register.alpha=0.01", env=team.erin, log=team.outputs)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # The same model as v1: linked to it, not registered a second time.
    assert "stages run:    register" in again.stdout and f"{MODEL} v1 is champion" in again.stdout
    assert "the same model as v1" in again.stdout, again.stdout[-3000:]
    client = mlflow.MlflowClient(tracking_uri=team.state["mlflow"]["url"])
    os.environ.update(team.carol)
    try:
        versions = client.search_model_versions(f"name='{MODEL}'")
        v1 = client.get_model_version(MODEL, "1")
        (linked,) = v1.tags["graft.also_registered_by"].split(",")
        run = client.get_run(linked)
        old = client.get_run(v1.run_id)
    finally:
        for key in team.carol:
            os.environ.pop(key, None)
    assert [str(v.version) for v in versions] == ["1"]
    assert linked != v1.run_id and run.data.tags["graft.training_run_id"] == v1.run_id == v1.tags["training_run_id"]
    assert run.data.metrics["test_accuracy"] == old.data.metrics["test_accuracy"]
    assert run.data.tags["graft.registered_version"] == f"{MODEL}/1"  # the new run names the version it ended with
    assert old.data.tags["graft.registered_version"] == f"{MODEL}/1"  # the old run keeps exactly its own registration


def test_bad_data_stops_the_run_at_validate_and_says_it_once(team):
    """The source gains an empty class and a corrupt file: stop at validate, exit 2."""
    (team.images / "empty").mkdir()
    (team.images / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    res = graft(team.project, "run", env=team.carol, log=team.outputs)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert out.count("cat/broken.png: error=") == 1 and out.count("empty: count=0") == 1
    assert "Traceback" not in out and "NoneType: None" not in out
    assert "graft run: stage 'validate' failed: bad input (exit code 2)" in out and "what to do:" in out
    # The failure went to the webhook too, which failed, and was reported by its host only.
    assert "graft notification to http://127.0.0.1:" in out


def test_no_secret_in_command_lines_files_logs_or_stores(team):
    """Runs last in the module: stops the servers, then searches everywhere."""
    from prefect.client.orchestration import get_client

    marks = [team.marks.pg, team.marks.hook, team.marks.carol, team.marks.dave, team.marks.erin,
             team.creds["MLFLOW_AUTH_ADMIN_PASSWORD"], team.creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
             team.creds["PREFECT_SERVER_API_AUTH_STRING"].split(":", 1)[1]]  # fmt: skip

    # Prefect's records of the run, through the team server's API (parameters and every log
    # line). Prefect reads its settings once: the environment set now would not move a client
    # already pointed elsewhere (the session's test server, or a temporary one).
    import asyncio

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    async def records():
        async with get_client() as client:
            assert str(client.api_url).startswith(team.state["prefect"]["url"].rstrip("/"))  # the team server
            runs = await client.read_flow_runs()
            logs = await client.read_logs()
            return [json.dumps(r.parameters, default=str) for r in runs], [log.message for log in logs]

    with temporary_settings(updates={PREFECT_API_URL: team.state["prefect"]["url"],
                                     PREFECT_API_AUTH_STRING: team.creds["PREFECT_SERVER_API_AUTH_STRING"]}):  # fmt: skip
        parameters, logs = asyncio.run(records())
    assert parameters and len(logs) > 20
    # The MLflow store, all of it: params, tags, the registry, alias history.
    store = team.pg.dump("mlflow")
    assert "graft.alias_history" in store and "carol" in store

    from flows import services

    services.stop(team.project)
    team.ps.stop()
    secrets_file = team.project / ".graft" / "secrets.yaml"
    # The searches can find what is there: the servers' command lines, the secrets file's contents.
    assert any("--app-name basic-auth" in s for s in team.ps.samples)
    assert team.marks.pg.encode() in secrets_file.read_bytes() and team.marks.hook.encode() in secrets_file.read_bytes()
    places = {"ps": "\n".join(team.ps.samples), "prefect parameters": "\n".join(parameters),
              "prefect logs": "\n".join(logs), "mlflow store (pg_dump)": store, "graft's output": "\n".join(team.outputs)}  # fmt: skip
    files = [p for p in team.project.rglob("*") if p.is_file() and not p.is_symlink() and p != secrets_file]
    assert any(p.name == "mlflow.log" for p in files) and any(p.suffix == ".db" for p in files)
    found = [(where, m) for where, text in places.items() for m in marks if m in text]
    for path in files:
        data = path.read_bytes()
        found += [(str(path.relative_to(team.project)), m) for m in marks if m.encode() in data]
    assert found == []
    assert oct(secrets_file.stat().st_mode & 0o777) == "0o600"
