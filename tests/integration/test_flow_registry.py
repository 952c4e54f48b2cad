"""End to end through the Prefect flow, with a real Prefect server (test harness), real
DVC and real MLflow (SQLite under the project copy), on a tiny Fashion-MNIST slice."""

import csv
import json
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import requires_fashion_mnist, set_params

pytestmark = [pytest.mark.slow, requires_fashion_mnist]

TINY = dict(
    ingest={"max_train_per_class": 16, "max_test_per_class": 4},
    preprocess={"image_size": 32},
    fine_tune={"epochs": 2, "batch_size": 16, "mode": "partial", "frozen_groups": 4, "lr": 0.003},
    register={"min_accuracy": 0.3, "min_improvement": 0.0},
)
cli = CliRunner()


def graft(project, *args):
    result = cli.invoke(app, [*args, "--project", str(project)])
    return result


def registry(project):
    import mlflow

    from stages import registry as reg

    client = mlflow.MlflowClient()
    return client, reg


def test_flow_registers_promotes_and_rolls_back(prefect_harness, project_run_env, tmp_path):
    from flows.training import training_pipeline

    project = project_run_env
    set_params(project, **TINY)

    # 1. The first run trains and registers version 1 as champion.
    first = training_pipeline(project_dir=str(project))
    assert set(first["stages"].values()) == {"ran"}
    assert first["decision"]["version"] == "1" and first["decision"]["alias"] == "champion"
    client, reg = registry(project)
    v1 = reg.alias_version(client, "graft-classifier", "champion")
    assert str(v1.version) == "1"
    for tag in ("git_commit", "data_version", "params_hash", "mlflow_run_id", "prefect_flow_run_id", "test_accuracy"):
        assert v1.tags.get(tag), tag
    assert v1.tags["prefect_flow_run_id"] == first["flow_run_id"]
    # The pipeline's run nests under the flow's parent run.
    run = client.get_run(v1.tags["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == first["mlflow_parent_run_id"]

    # 2. graft predict on a folder: one row per image, same classes as graft's own evaluation.
    folder = tmp_path / "test_images"
    folder.mkdir()
    ids = [str(i) for i in np.load(project / "data/prepared/test_ids.npy")]
    with tarfile.open(project / "data/raw/images.tar") as tar:
        for m in tar:
            if m.name.split(".")[0] in ids:
                (folder / m.name).write_bytes(tar.extractfile(m).read())
    out = tmp_path / "pred.csv"
    res = graft(project, "predict", str(folder), "--out", str(out))
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(ids)
    ours = {r["id"]: r for r in csv.DictReader((project / "reports/evaluate/predictions.csv").open())}
    for r in rows:
        sample = r["path"].rsplit("/", 1)[1].split(".")[0]
        assert r["class"] == ours[sample]["predicted"]
        assert float(r["probability"]) == pytest.approx(float(ours[sample]["confidence"]), abs=1e-4)

    # 3. Nothing changed: every stage is cached and nothing new is registered.
    second = training_pipeline(project_dir=str(project))
    assert set(second["stages"].values()) == {"cached"}
    assert len(client.search_model_versions("name='graft-classifier'")) == 1

    # 4. A worse model (a learning rate too small to learn) stays challenger.
    third = training_pipeline(project_dir=str(project), overrides=["fine_tune.lr=0.0000001", "fine_tune.epochs=1"])
    assert third["stages"]["fine_tune"] == "ran" and third["stages"]["ingest"] == "cached"
    assert third["decision"]["version"] == "2" and third["decision"]["alias"] == "challenger"
    assert third["decision"]["champion_accuracy"] > third["decision"]["candidate_accuracy"]
    assert third["decision"]["mcnemar"]["p_value"] <= 1.0
    assert str(reg.alias_version(client, "graft-classifier", "champion").version) == "1"
    assert str(reg.alias_version(client, "graft-classifier", "challenger").version) == "2"

    # The gate refuses a worse version; --force promotes it; rollback restores v1.
    res = graft(project, "promote", "2")
    assert res.exit_code == 1 and "did not pass the gate" in res.output
    res = graft(project, "promote", "2", "--force", "--reason", "test")
    assert res.exit_code == 0, res.output
    assert str(reg.alias_version(client, "graft-classifier", "champion").version) == "2"
    res = graft(project, "rollback")
    assert res.exit_code == 0, res.output
    assert str(reg.alias_version(client, "graft-classifier", "champion").version) == "1"
    moves = [(h["alias"], h["from_version"], h["to_version"]) for h in reg.history(client, "graft-classifier")]
    assert moves == [("champion", None, "1"), ("challenger", None, "2"), ("champion", "1", "2"), ("champion", "2", "1")]

    res = graft(project, "status")
    assert res.exit_code == 0 and "champion   v1" in res.output and "rollback" in res.output


def test_validation_failure_stops_the_flow_at_validate(prefect_harness, project_run_env, tmp_path):
    from flows.training import StageFailed, training_pipeline
    from tests.conftest import make_image_folder

    project = project_run_env
    src = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=12)
    (src / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    set_params(project, ingest={"source": "imagefolder", "path": str(src), "max_train_per_class": None}, **{k: v for k, v in TINY.items() if k != "ingest"})
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed) as e:
        state.result()
    assert e.value.stage == "validate" and e.value.exit_code == 2 and not e.value.retryable
    assert "a/broken.png" in str(e.value)
    for later in ("data/prepared", "models/pretrained", "models/fine_tuned"):
        assert not (project / later).exists(), later
    assert json.loads((project / "reports/validation.json").read_text())["success"] is False
