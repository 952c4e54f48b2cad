"""Scheduled and data-triggered retraining on real servers: Prefect and MLflow servers
started as graft's background services on free loopback ports, a deployment with a cron
schedule, a run triggered through it, the data sensor, overlapping runs, webhooks."""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from flows import services
from tests.conftest import make_image_folder, project_env, set_params
from tests.integration.conftest import prefect_task_runs

pytestmark = pytest.mark.slow

TINY = dict(
    preprocess={"image_size": 32},
    fine_tune={"epochs": 1, "batch_size": 16, "mode": "partial", "frozen_groups": 4},
    register={"min_accuracy": 0.0},
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_config(project, **sections):
    path = project / "graft.yaml"
    cfg = yaml.safe_load(path.read_text())
    for k, v in sections.items():
        cfg[k] = {**(cfg.get(k) or {}), **v}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


class Webhook:
    """A tiny HTTP server on loopback that records the JSON bodies POSTed to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def webhook(monkeypatch):
    hook = Webhook()
    monkeypatch.setenv("GRAFT_WEBHOOK_URL", hook.url)
    yield hook
    hook.close()


@pytest.fixture
def servers(project):
    """Real Prefect and MLflow servers for the project copy, stopped (and checked gone) after."""
    from flows import services

    set_config(project, servers={"prefect": {"port": free_port()}, "mlflow": {"port": free_port()}})
    started = services.start(project)
    yield started
    services.stop(project)
    for st in started.values():
        assert services.group_members(st["pid"]) == [], f"processes left behind by {st}"


def wait_for_scheduled_run(deployment: str, timeout: float):
    """The deployment's first flow run, once it has ended (polling the Prefect API)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async def runs():
        async with get_client() as client:
            dep = await client.read_deployment_by_name(deployment)
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = [r for r in asyncio.run(runs()) if r.state and r.state.is_final()]
        if ended:
            return ended[0]
        time.sleep(3)
    raise AssertionError(f"no run of {deployment} ended within {timeout:.0f} s")


def test_scheduled_deployment_runs_on_real_servers(project, servers, tmp_path, monkeypatch):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import services
    from flows.deploy import deployment_names, deployments

    src = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=14)
    set_params(project, ingest={"source": "imagefolder", "path": str(src), "max_train_per_class": None}, **TINY)
    # A cron a minute or two away: the schedule itself fires the run (Prefect's scheduler
    # creates it, `graft serve` picks it up), not run_deployment. The flows are imported
    # first, so the deployment exists within a second or two of `now`; Prefect schedules
    # a new deployment's runs within 5 s (its recent-deployments loop): 10 s is enough.
    import flows.sensor  # noqa: F401
    import flows.training  # noqa: F401

    now = datetime.datetime.now(datetime.UTC)
    fire = (now + datetime.timedelta(minutes=1 if now.second < 50 else 2)).replace(second=0, microsecond=0)
    cron = f"{fire.minute} {fire.hour} * * *"
    set_config(project, schedule={"cron": cron, "timezone": "UTC"})
    st = services.status(project)
    assert st["prefect"]["running"] and st["mlflow"]["running"]
    env = {**project_env(project), **services.client_env(project)}
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")

    train_name, _ = deployment_names(project)
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        for d in deployments(project, sensor=True, verify=True):
            d.apply()

        async def schedule_of(name):
            async with get_client() as client:
                dep = await client.read_deployment_by_name(name)
                return [s.schedule.cron for s in dep.schedules]

        import asyncio

        assert asyncio.run(schedule_of(f"graft-training/{train_name}")) == [cron]
        # `graft schedule --verify`: the champion's reproduction, weekly by default.
        assert asyncio.run(schedule_of(f"graft-verify/{project.name}-verify")) == ["0 4 * * 0"]

        # `graft serve` runs the deployments' runs in its own process.
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--project", str(project)],
                                 cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
        try:
            run = wait_for_scheduled_run(f"graft-training/{train_name}", timeout=(fire - now).total_seconds() + 400)
            assert run.auto_scheduled and run.expected_start_time == fire
            assert run.state.is_completed(), run.state
        finally:
            os.killpg(serve.pid, signal.SIGINT)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()

    # The run and the model version are in the MLflow server's store, in the `graft` experiment.
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name='graft-classifier'")
    assert len(versions) == 1 and versions[0].tags["prefect_flow_run_id"] == str(run.id)
    pipeline_run = client.get_run(versions[0].run_id)
    assert pipeline_run.info.status == "FINISHED"
    assert client.get_experiment(pipeline_run.info.experiment_id).name == "graft"
    assert client.search_runs(["0"]) == []
    # Named for the project and what ran, in both UIs: not random words.
    assert client.get_run(pipeline_run.data.tags["mlflow.parentRunId"]).info.run_name == f"{project.name}: every stage"
    assert read_flow_run(st["prefect"]["url"], str(run.id)).name == f"{project.name}: run"
    assert str(client.get_model_version_by_alias("graft-classifier", "champion").version) == "1"

    # `graft ui` with the server up points at it instead of starting a second one.
    ui = subprocess.run([sys.executable, "-m", "flows.cli", "ui", "--project", str(project)], cwd=project, env=env,
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    # It opens on the experiment's runs table (MLflow 3 would land on its GenAI overview).
    landing = f"{st['mlflow']['url']}/#/experiments/{pipeline_run.info.experiment_id}?workflowType=machine_learning"
    assert ui.returncode == 0 and f"already serves the UI: open {landing} in a browser" in ui.stdout, ui.stdout

    noop_run_is_recorded(project, env)
    parent_name = client.get_run(pipeline_run.data.tags["mlflow.parentRunId"]).info.run_name
    browse_the_uis(st, pipeline_run, str(run.id), tmp_path, landing, parent_name)
    noop_run_without_servers(project, env, tmp_path)


def noop_run_without_servers(project, env, tmp_path):
    """With no graft servers, a no-op `graft run` goes through the flow on Prefect's
    temporary server, records every stage Cached in the project's own Prefect database (the
    one `graft server start` serves: one history with the scheduled runs), tagged with the
    project, and leaves no server running."""
    import sqlite3

    import psutil

    from flows.pipeline import pipeline

    services.stop(project)
    home = tmp_path / "prefect-home"
    clean = {k: v for k, v in env.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_AUTH_STRING")}
    clean.update(PREFECT_HOME=str(home))

    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--project", str(project)], cwd=project,
                         env=clean, capture_output=True, text=True, timeout=300)  # fmt: skip
    said = res.stdout[-2000:] + res.stderr[-3000:]
    assert res.returncode == 0, said
    assert "servers: Prefect's temporary local server (its history in .graft/prefect" in res.stdout, said
    assert "stages run:    none" in res.stdout, said

    assert not (home / "prefect.db").exists()  # not the machine-wide history
    db = sqlite3.connect(project / ".graft" / "prefect" / "prefect.db")
    try:
        runs = db.execute("SELECT id, tags FROM flow_run WHERE state_type = 'COMPLETED' ORDER BY end_time").fetchall()
        run_id, run_tags = runs[-1]
        tasks = db.execute("SELECT name, state_type, state_name FROM task_run WHERE flow_run_id = ?", (run_id,)).fetchall()
    finally:
        db.close()
    assert len(runs) >= 3, runs  # the scheduled run and the no-op run on the server, then this one: one history
    assert f"project:{project.name}" in json.loads(run_tags)
    assert sorted(n.rsplit("-", 1)[0].removeprefix("dvc-") for n, _, _ in tasks) == sorted(pipeline(project).order)
    assert {(t, n) for _, t, n in tasks} == {("COMPLETED", "Cached")}
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "prefect" in " ".join(proc.info["cmdline"] or ()) and proc.environ().get("PREFECT_HOME") == str(home):
                left.append(proc)
        except psutil.Error:
            pass
    assert left == [], "Prefect's temporary server was left running"


def noop_run_is_recorded(project, env):
    """Nothing changed since the scheduled run: `graft run` goes through the flow, which
    finds every stage up to date in DVC's view and records the run, every stage Cached with
    DVC's edges as its inputs; no MLflow run is made for it."""
    import time as time_

    import mlflow

    from flows.pipeline import pipeline

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    api = env["PREFECT_API_URL"]
    before = {r.id for r in training_flow_runs(api)}

    t0 = time_.perf_counter()
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--project", str(project)], cwd=project,
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    print(f"no-op graft run with the servers up: {time_.perf_counter() - t0:.2f} s")  # the benchmark holds the target
    said = res.stdout[-2000:] + res.stderr[-3000:]
    assert res.returncode == 0, said
    assert "stages run:    none" in res.stdout, said
    new = [r for r in training_flow_runs(api) if r.id not in before]
    assert len(new) == 1 and new[0].state.is_completed()
    tasks, _ = prefect_task_runs(new[0].id, api)
    graph = pipeline(project)
    assert sorted(tasks) == sorted(graph.order)
    assert all(t.state.is_completed() and t.state.name == "Cached" for t in tasks.values())
    for stage, t in tasks.items():  # every DVC edge is drawn (Prefect adds teach -> drift of its own accord)
        waits = {tasks.stage_of.get(i.id, str(i.id)) for i in t.task_inputs.get("wait_for", [])}
        assert set(graph.upstream[stage]) <= waits <= set(graph.order), (stage, waits)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before


def training_flow_runs(api_url):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["graft-training"])))

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def browse_the_uis(st, pipeline_run, flow_run_id, shots, landing, parent_name):
    """A real headless Chromium on the servers' UIs: the run under `graft` with its
    metrics, the registered model with its champion alias, the Prefect flow run page."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("chromium and chromium-driver are needed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))

    def page_shows(url, *texts, shot):
        driver.get(url)
        try:
            WebDriverWait(driver, 60).until(lambda d: all(t in d.find_element("tag name", "body").text for t in texts))
        finally:
            driver.save_screenshot(str(shots / f"{shot}.png"))

    try:
        mlflow_ui = services.ui_url(st["mlflow"])
        exp, run_id = pipeline_run.info.experiment_id, pipeline_run.info.run_id
        page_shows(f"{mlflow_ui}/#/experiments/{exp}/runs/{run_id}", "graft", pipeline_run.info.run_name,
                   "test_accuracy", shot="mlflow-run")  # fmt: skip
        # The page `graft ui` sends a person to: the runs table, the pipeline's run named for what it was.
        page_shows(landing, "Runs", parent_name, shot="mlflow-experiment")
        assert "Detect Issues" not in driver.find_element("tag name", "body").text  # not MLflow 3's GenAI overview
        page_shows(f"{mlflow_ui}/#/models/graft-classifier", "graft-classifier", "champion", shot="mlflow-model")
        flow_name = read_flow_run(st["prefect"]["url"], flow_run_id).name
        page_shows(f"{services.ui_url(st['prefect'])}/runs/flow-run/{flow_run_id}", flow_name, "Completed",
                   shot="prefect-flow-run")  # fmt: skip
    finally:
        driver.quit()


def read_flow_run(api_url, flow_run_id):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def test_sensor_overlap_and_webhooks(prefect_harness, project_run_env, tmp_path, webhook):
    from flows.pipeline import ProjectLock, StageFailed
    from flows.sensor import data_sensor
    from flows.training import training_pipeline

    project = project_run_env
    src = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=14)
    set_params(project, ingest={"source": "imagefolder", "path": str(src), "max_train_per_class": None}, **TINY)

    # No accepted run yet: the sensor starts training; the promotion is announced.
    first = data_sensor(project_dir=str(project))
    assert first["triggered"] and first["summary"]["decision"]["alias"] == "champion"
    promoted = [m for m in webhook.received if m["event"] == "promoted"]
    assert len(promoted) == 1 and promoted[0]["version"] == "1" and "accuracy" in promoted[0]["metrics"]

    # Nothing changed: no training run.
    second = data_sensor(project_dir=str(project))
    assert second["triggered"] is False

    # A second run while one holds the project: skip returns at once, wait waits.
    holder = ProjectLock(project)
    assert holder.acquire(wait=False)
    try:
        skipped = training_pipeline(project_dir=str(project), concurrency="skip")
        assert skipped["skipped"] is True
        threading.Timer(3.0, holder.release).start()
        t0 = time.monotonic()
        waited = training_pipeline(project_dir=str(project), concurrency="wait", wait_timeout=60)
        assert time.monotonic() - t0 >= 2.5 and set(waited["stages"].values()) == {"cached"}
    finally:
        holder.release()

    # New data: the sensor triggers; a broken file fails the run at validate and is announced.
    (src / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    state = data_sensor(project_dir=str(project), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed):
        state.result()
    failed = [m for m in webhook.received if m["event"] == "run_failed"]
    assert len(failed) == 1 and failed[0]["stage"] == "validate" and "b/broken.png" in failed[0]["error"]


def test_graft_ui_refuses_a_port_another_program_holds(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        res = CliRunner().invoke(app, ["ui", "--port", str(port), "--project", str(tmp_path)])
    assert res.exit_code == 1 and f"port {port} on 127.0.0.1 is in use by another program" in res.output
