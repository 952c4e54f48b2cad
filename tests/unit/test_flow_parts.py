"""Small pieces of the orchestration layer: retry policy, stage options, the project
lock, the data fingerprint, webhooks."""

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prefect.states import Failed

from flows.fingerprint import fingerprint
from flows.notify import notify
from flows.pipeline import ProjectLock, StageFailed
from flows.training import _retry_condition, mlflow_run_name, name_for
from graft.config.params import ParamsError
from graft.config.project import stage_options
from tests.conftest import ROOT, make_image_folder


def test_bad_input_is_not_retried_but_crashes_are():
    bad = StageFailed("validate", 2, "validate: FAILED")
    crash = StageFailed("register", 1, "ConnectionError")
    assert _retry_condition(None, None, Failed(data=bad)) is False
    assert _retry_condition(None, None, Failed(data=crash)) is True
    assert _retry_condition(None, None, Failed(data=TimeoutError())) is True
    assert "validate: FAILED" in str(bad) and bad.headline == "stage 'validate' failed: bad input (exit code 2)"


def test_planned_stages_follow_the_graph_from_the_changed_ones():
    from flows.pipeline import Pipeline

    chain = Pipeline(["a", "b", "c", "d"], {"a": [], "b": ["a"], "c": ["b"], "d": ["a"]})
    assert chain.downstream_of({"b"}) == ["b", "c"]
    assert chain.downstream_of({"a"}) == ["a", "b", "c", "d"]
    assert chain.downstream_of(set()) == []


def test_project_graph_comes_from_dvc():
    from flows.pipeline import pipeline

    graph = pipeline(ROOT)
    assert sorted(graph.order) == sorted(["ingest", "validate", "preprocess", "load_pretrained", "drift", "teach",
                                          "fine_tune", "evaluate", "register"])  # fmt: skip
    # an order the graph defines: every stage after its upstream stages (ties are DVC's to break)
    for stage, before in graph.upstream.items():
        assert all(graph.order.index(b) < graph.order.index(stage) for b in before), stage
    assert graph.upstream["evaluate"] == ["fine_tune", "ingest", "preprocess"]
    assert graph.upstream["fine_tune"] == ["drift", "load_pretrained", "preprocess", "teach"]  # the drift gate first
    assert set(graph.downstream_of({"load_pretrained"})) == {"load_pretrained", "drift", "fine_tune", "evaluate", "register"}


def test_stage_options_overlay_defaults(tmp_path):
    (tmp_path / "graft.yaml").write_text("stages:\n  default: {retries: 1}\n  ingest: {timeout_seconds: 60}\n")
    assert stage_options(tmp_path, "fine_tune").retries == 1
    assert (stage_options(tmp_path, "ingest").retries, stage_options(tmp_path, "ingest").timeout_seconds) == (1, 60)
    # graft.yaml is parsed whole, once: a misspelt key anywhere is refused, naming it
    (tmp_path / "graft.yaml").write_text("stages:\n  default: {retries: 1}\n  ingest: {retriez: 3}\n")
    with pytest.raises(ParamsError, match="graft.yaml: unknown key.s. stages.ingest.retriez"):
        stage_options(tmp_path, "fine_tune")


def test_project_lock_is_exclusive(tmp_path):
    a, b = ProjectLock(tmp_path), ProjectLock(tmp_path)
    assert a.acquire(wait=False)
    assert not b.acquire(wait=False)
    assert not b.acquire(wait=True, timeout=0.3, poll=0.1)
    a.release()
    assert b.acquire(wait=False)
    b.release()


def test_fingerprint_changes_with_the_data(tmp_path):
    src = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    (tmp_path / "params.yaml").write_text(
        f"ingest:\n  source: imagefolder\n  path: {src}\n  seed: 0\n"
    )
    first = fingerprint(tmp_path)
    assert first == fingerprint(tmp_path) and first["files"] == 6
    sorted((src / "a").iterdir())[0].unlink()
    assert fingerprint(tmp_path)["fingerprint"] != first["fingerprint"]


def test_fingerprint_counts_what_ingest_reads_and_nothing_else(tmp_path):
    """A README.txt or a hidden file in the source once triggered a retraining that
    ingest then ignored; a new (even empty) class folder is a real change."""
    src = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    (tmp_path / "params.yaml").write_text(f"ingest:\n  source: imagefolder\n  path: {src}\n  seed: 0\n")
    before = fingerprint(tmp_path)
    (src / "a" / "README.txt").write_text("notes")
    (src / "b" / ".DS_Store").write_bytes(b"x")
    assert fingerprint(tmp_path) == before
    (src / "c").mkdir()
    assert fingerprint(tmp_path)["fingerprint"] != before["fingerprint"]
    (tmp_path / "params.yaml").write_text(f"ingest:\n  source: imagefolder\n  path: {tmp_path / 'gone'}\n  seed: 0\n")
    missing = fingerprint(tmp_path)
    assert missing["files"] == 0 and "no such directory" in missing["error"]


def test_webhook_receives_payload_and_failures_are_not_fatal(tmp_path, monkeypatch):
    got = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GRAFT_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/")
        assert notify(tmp_path, "promoted", {"version": "3"}) is True
        assert b'"version": "3"' in got[0] and b'"event": "promoted"' in got[0]
    finally:
        server.shutdown()
    monkeypatch.setenv("GRAFT_WEBHOOK_URL", "http://127.0.0.1:9/nothing-listens")
    assert notify(tmp_path, "run_failed", {"stage": "x"}) is False


def test_servers_on_every_interface_advertise_an_address_other_machines_can_use(tmp_path):
    from flows import services

    (tmp_path / "graft.yaml").write_text("servers:\n  prefect: {host: 0.0.0.0, port: 4300}\n  mlflow: {host: 0.0.0.0, port: 5300}\n")
    specs = services.commands(tmp_path, *services.server_config(tmp_path))
    public = services.public_host("0.0.0.0")
    assert public not in ("0.0.0.0", "127.0.0.1")
    assert specs["prefect"]["url"] == f"http://{public}:4300/api" and specs["mlflow"]["url"] == f"http://{public}:5300"
    cmd = specs["mlflow"]["cmd"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert f"{public}:5300" in allowed and "localhost:5300" in allowed
    (tmp_path / "graft.yaml").write_text("servers:\n  mlflow: {port: 5300}\n")
    local = services.commands(tmp_path, *services.server_config(tmp_path))["mlflow"]
    assert local["url"] == "http://127.0.0.1:5300" and "--allowed-hosts" not in local["cmd"]


def test_a_worker_installs_only_what_its_environment_lacks(tmp_path):
    from flows.environment import requirements, unmet

    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["pyyaml>=1", "pyyaml<1", "no-such-package-graft>=1", '
        '"pyyaml>=1; sys_platform == \'no-such-os\'"]\n'
    )
    assert unmet(requirements(tmp_path)) == ["pyyaml<1", "no-such-package-graft>=1"]
    assert unmet(requirements(ROOT)) == []  # this environment runs graft itself


def test_a_checkout_for_workers_must_be_on_the_repository_they_clone(tmp_path):
    import subprocess

    from flows.deploy import checkout_for, pull_steps
    from graft.base.errors import GraftError

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "f").write_text("x")
    subprocess.run([*git, "add", "f"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=work, check=True)
    with pytest.raises(GraftError, match="no `origin`"):
        checkout_for(work)
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=work, check=True)
    with pytest.raises(GraftError, match="branch 'main' is not on"):
        checkout_for(work)
    subprocess.run(["git", "push", "-q", "origin", "main"], cwd=work, check=True)
    checkout = checkout_for(work)
    assert (checkout.repository, checkout.branch, checkout.commit) == (str(origin), "main", None)
    clone, prepare = pull_steps(checkout)
    assert clone["prefect.deployments.steps.git_clone"]["branch"] == "main"
    assert prepare["prefect.deployments.steps.run_shell_script"]["directory"] == "{{ clone.directory }}"
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    assert pull_steps(checkout_for(work, commit=sha))[0]["prefect.deployments.steps.git_clone"]["commit_sha"] == sha


def test_dvcs_missing_files_warning_is_said_once_with_its_count():
    """DVC lists every file dvc.lock names that no cache or remote has, again on each pull:
    the flow keeps one line, counting distinct files."""
    from flows.remote import MissingOutputs

    notes = MissingOutputs()
    output = ["Running stage 'fine_tune':",
              "WARNING: Some of the cache files do not exist neither locally nor on remote. Missing cache files:",
              "name: models/fine_tuned/weights.pt, md5: 0123", "name: models/fine_tuned/model.json, md5: 4567",
              "> python -m stages.fine_tune",
              "WARNING: Some of the cache files do not exist neither locally nor on remote. Missing cache files:",
              "name: models/fine_tuned/weights.pt, md5: 0123",
              "epoch 1/2: train loss 2.3"]  # fmt: skip
    shown = [line for line in output if not notes.swallow(line)]
    assert shown == ["Running stage 'fine_tune':", "> python -m stages.fine_tune", "epoch 1/2: train loss 2.3"]
    said = notes.summary("fine_tune")
    assert said is not None and said.startswith("fine_tune: dvc.lock names 2 file(s) that are in no DVC cache and on no remote")
    assert MissingOutputs().summary("x") is None


def test_runs_are_named_for_the_project_and_what_they_change(tmp_path):
    """Prefect's runs list and MLflow's runs table read as the project's history."""
    order = ["ingest", "validate", "fine_tune", "evaluate", "register"]
    project = tmp_path / "shoes"
    assert mlflow_run_name(project, order, order) == "shoes: every stage"
    assert mlflow_run_name(project, order[2:], order) == "shoes: from fine_tune"
    assert mlflow_run_name(project, ["register"], order) == "shoes: register"
    assert name_for({"project_dir": str(project), "overrides": ["fine_tune.lr=0.001"]}) == "shoes: --set fine_tune.lr=0.001"
    assert name_for({"project_dir": str(project)}) == "shoes: run"


def test_without_servers_prefect_keeps_the_projects_own_history(tmp_path, monkeypatch):
    """No graft servers: Prefect's temporary server writes to the database `graft server
    start` serves (the project's), not ~/.prefect; a server or a database the user set wins."""
    from flows import services

    for key in ("PREFECT_API_URL", *services.DB_KEYS):
        monkeypatch.delenv(key, raising=False)
    env = services.client_env(tmp_path)
    assert env[services.DB_KEYS[0]] == f"sqlite+aiosqlite:///{tmp_path.resolve() / '.graft' / 'prefect' / 'prefect.db'}"
    assert services.prefect_home(tmp_path).is_dir() and services.project_tag(tmp_path) == f"project:{tmp_path.name}"
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.5:4200/api")
    assert services.DB_KEYS[0] not in services.client_env(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://u@db/prefect")
    assert services.DB_KEYS[0] not in services.client_env(tmp_path)
