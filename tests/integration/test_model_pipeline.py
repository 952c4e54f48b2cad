"""The whole pipeline through real DVC with real MLflow (SQLite under the project copy)
on a tiny Fashion-MNIST slice at a tiny image size."""

import json

import pytest

from tests.conftest import dvc, requires_fashion_mnist, set_params

pytestmark = [pytest.mark.slow, requires_fashion_mnist]

TINY = dict(
    ingest={"max_train_per_class": 12, "max_test_per_class": 4},
    preprocess={"image_size": 32},
    fine_tune={"epochs": 2, "batch_size": 16, "mode": "partial", "frozen_groups": 4},
)


def test_pipeline_logs_one_mlflow_run(project):
    import mlflow

    set_params(project, **TINY)
    result = dvc(project, "repro", check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("metrics.json", "confusion_matrix.png", "reliability.png", "worst_mistakes.png", "predictions.csv"):
        assert (project / "reports/evaluate" / name).is_file(), name
    metrics = json.loads((project / "reports/evaluate/metrics.json").read_text())
    # The headline agrees with the per-image predictions written beside it (the accuracy
    # guard, test_accuracy_guard.py, checks that it is any good).
    import csv

    rows = list(csv.DictReader((project / "reports/evaluate/predictions.csv").open()))
    assert metrics["n"] == len(rows) == 40
    assert metrics["accuracy"] == pytest.approx(sum(r["actual"] == r["predicted"] for r in rows) / len(rows))

    run_id = json.loads((project / "models/fine_tuned/mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["fine_tune.epochs"] == "2" and run.data.params["preprocess.image_size"] == "32"
    assert run.data.params["ingest.source"] == "fashion-mnist"
    # Plain `dvc repro` (no Prefect) logs into the `graft` experiment too, not "Default".
    assert client.get_experiment(run.info.experiment_id).name == "graft" and run.info.experiment_id != "0"
    tags = run.data.tags
    # set_params edited params.yaml after the copy's commit: the run must say so.
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git_dirty"] == "true"
    assert tags["pretrained_weights_sha256"].startswith("57934424")
    assert tags["data_version"].endswith(".dir")
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert len(client.get_metric_history(run_id, "val_accuracy")) == 2  # one per epoch
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/metrics.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "training")} >= {"training/history.csv", "training/learning_curves.png"}

    # DVC's metrics are the model's figures only (data statistics are plain outputs), so
    # `dvc exp show` leads with accuracy, macro-F1 and ECE.
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = shown[""]["data"] if "" in shown else next(iter(shown.values()))["data"]
    assert set(files) == {"reports/evaluate/metrics.json"}
    header = dvc(project, "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    first_metrics = [h for h in header if h in ("accuracy", "macro_f1", "ece", "n")]
    assert first_metrics and header.index("accuracy") < min(i for i, h in enumerate(header) if "." in h)
    assert not any("class_counts" in h or h.startswith("images.") for h in header)
    # Plots: the two learning-curve charts and the model's images, no chart of every history column.
    plots = json.loads(dvc(project, "plots", "show", "--json").stdout)["data"]
    assert "reports/fine_tune/history.csv" not in plots
    assert {"Learning curves (loss)", "Learning curves (accuracy)", "reports/evaluate/predictions.csv"} <= set(plots)

    # Same params and data: nothing reruns. A new fine_tune param reruns fine_tune and what follows it only.
    again = dvc(project, "repro")
    assert "Running stage" not in again.stdout
    set_params(project, fine_tune={"lr": 0.001})
    third = dvc(project, "repro")
    ran = {line.split("'")[1] for line in third.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"fine_tune", "evaluate", "register"}
