"""Runs left RUNNING by a killed plain `dvc repro` (which takes no lock) are settled by
`graft status`; a run whose process is still alive is left alone."""

import subprocess
import sys

from typer.testing import CliRunner

from flows.cli import app
from graft.tracking import runs as tracking


def test_graft_status_settles_runs_whose_process_died(project, monkeypatch):
    import mlflow

    monkeypatch.chdir(project)
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (project / "mlruns").mkdir(exist_ok=True)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment(tracking.experiment_name())
    dead = subprocess.run([sys.executable, "-c", "import os, psutil; p = psutil.Process(); "
                           "print(f'{os.getpid()} {p.create_time():.2f}')"], capture_output=True, text=True)  # fmt: skip
    host = tracking.this_process().split()[0]
    root = str(project.resolve())
    killed = client.create_run(experiment, tags={tracking.PROJECT_TAG: root, tracking.PROCESS_TAG: f"{host} {dead.stdout.strip()}"})
    alive = client.create_run(experiment, tags={tracking.PROJECT_TAG: root, tracking.PROCESS_TAG: tracking.this_process()})
    other = client.create_run(experiment, tags={tracking.PROJECT_TAG: "/another/project"})

    res = CliRunner().invoke(app, ["status", "--project", str(project)], prog_name="graft")
    assert res.exit_code == 0, res.output
    assert f"MLflow run {killed.info.run_id} was left RUNNING by a run that died: marked FAILED" in res.output
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # a live `dvc repro`: not a wreck
    assert client.get_run(other.info.run_id).info.status == "RUNNING"  # not this project's
