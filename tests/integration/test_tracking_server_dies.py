"""The MLflow tracking server dies in the middle of training (its process group killed
with SIGKILL by the test): the stage stops within a bounded time with a message that
says what to do, keeps its checkpoint, and after a restart the rerun resumes and logs
the epochs the server missed; runs left RUNNING end FAILED."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import project_env, requires_fashion_mnist, set_params
from tests.integration.test_services import free_port, set_config

pytestmark = [pytest.mark.slow, requires_fashion_mnist]


def test_killed_tracking_server_gives_a_clear_error_and_nothing_is_lost(project):
    import mlflow

    from flows import services
    from graft.base import fsio
    from graft.tracking import runs as tracking

    set_params(project, ingest={"max_train_per_class": 40, "max_test_per_class": 4}, preprocess={"image_size": 32},
               fine_tune={"epochs": 4, "batch_size": 16, "mode": "partial", "frozen_groups": 4, "patience": 9})  # fmt: skip
    set_config(project, servers={"prefect": {"port": free_port()}, "mlflow": {"port": free_port()}})
    started = services.start(project)
    try:
        env = {**project_env(project), **services.client_env(project)}
        uri = env["MLFLOW_TRACKING_URI"]
        res = subprocess.run([sys.executable, "-m", "dvc", "repro", "load_pretrained", "teach", "drift"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

        stage = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "fine_tune"], cwd=project,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        lines = []
        for line in stage.stdout:
            lines.append(line)
            if line.startswith("epoch 1/4: train loss"):
                break
        os.killpg(started["mlflow"]["pid"], signal.SIGKILL)  # the server dies, no goodbye
        killed = time.monotonic()
        lines += stage.stdout.readlines()
        stage.wait(timeout=300)
        seconds = time.monotonic() - killed
        out = "".join(lines)
        assert stage.returncode != 0
        assert f"tracking server at {uri} unreachable: start it with `graft server start` or unset MLFLOW_TRACKING_URI" in out
        assert out.count("unreachable") == 1 and "Traceback" not in out, out[-3000:]
        assert seconds < 90, f"{seconds:.0f}s from the kill to the error"
        print(f"\nkill -> clear error: {seconds:.1f}s")
        checkpoint = project / ".graft" / "checkpoints" / "fine_tune.pt"
        assert checkpoint.is_file()  # training kept what it had

        services.start(project)  # same store: the runs are still there
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_id = client.get_experiment_by_name("graft").experiment_id
        stuck = tracking.end_orphans(client, experiment_id, project.resolve())
        assert len(stuck) == 1  # the training run the dead server never heard end
        run_id = stuck[0]
        assert client.get_run(run_id).info.status == "FAILED"

        res = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "fine_tune"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "fine_tune: resuming after epoch" in res.stdout and "that had not reached the tracking server" in res.stdout
        assert fsio.read_json(project / "models/fine_tuned/mlflow_run.json")["run_id"] == run_id
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2, 3, 4]  # nothing lost
    finally:
        services.stop(project)
