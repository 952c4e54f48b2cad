"""Knowledge distillation end to end, through plain DVC on a tiny Fashion-MNIST slice: a
registered champion teaches a smaller student (another architecture, from scratch, at a
lower resolution); the teacher's soft labels are a DVC output of their own stage; the
student's run, model and registry entry name the teacher; a bad teacher stops the
pipeline before any training with exit code 2."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import copy_project, dvc, project_env, requires_fashion_mnist, set_params
from tests.integration.test_register_faults import TINY

pytestmark = [pytest.mark.slow, requires_fashion_mnist]

# The teacher: the fault tests' tiny recipe (one fact in one place).
TEACHER = TINY
# A different network (0.6 M parameters against 3.4 M), trained from scratch, at 24 px.
STUDENT = dict(
    preprocess={"image_size": 24},
    load_pretrained={"architecture": "mobilenetv3_small_050", "source": "scratch:mobilenetv3_small_050"},
    fine_tune={"epochs": 2, "batch_size": 16, "mode": "full", "frozen_groups": 0},
    distill={"teacher": "champion", "temperature": 3.0, "alpha": 0.8},
)


def client_for(project):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=project_env(project)["MLFLOW_TRACKING_URI"])


def repro(project, *targets):
    res = dvc(project, "repro", *targets, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """v1: the default model (the teacher, champion); v2: the student it taught."""
    project = copy_project(tmp_path_factory.mktemp("distill") / "project")
    set_params(project, **TEACHER)
    repro(project)
    set_params(project, **STUDENT)
    repro(project)
    return project


def test_a_champion_teaches_a_student_and_the_registry_knows(distilled):
    project = distilled
    info = json.loads((project / "data/teacher/teacher.json").read_text())
    (teacher,) = info["teachers"]
    assert (teacher["reference"], teacher["model_name"], teacher["version"]) == ("champion", "graft-classifier", "1")
    assert teacher["input"]["image_size"] == 32  # the teacher read the raw images its own way
    train_y = np.load(project / "data/prepared/train_y.npy")
    logits = np.load(project / "data/teacher/logits.npy")
    assert logits.shape == (len(train_y), 1, 10) and logits.dtype == np.float32 and np.isfinite(logits).all()
    # The logits are the champion's on those images: its train accuracy from them is its own.
    report = json.loads((project / "reports/teach.json").read_text())
    assert report["teachers"][0]["train_accuracy"] == pytest.approx(float((logits[:, 0].argmax(1) == train_y).mean()))

    # The drift gate compared the student's data with the champion's reference through the
    # champion's own backbone (the student's is another network), rebuilt from its source.
    drift = json.loads((project / "reports/drift/drift.json").read_text())
    assert drift["re_embedded"] is True and drift["reference"]["origin"] == "graft-classifier v1"
    assert drift["verdict"] == "no_drift" and drift["reference"]["backbone"]["architecture"] == "tf_efficientnet_lite0"

    student = json.loads((project / "models/fine_tuned/model.json").read_text())
    assert student["architecture"] == "mobilenetv3_small_050" and student["input"]["image_size"] == 24
    lineage = student["distilled_from"]
    assert lineage["temperature"] == 3.0 and lineage["alpha"] == 0.8
    client = client_for(project)
    v1 = client.get_model_version("graft-classifier", "1")
    assert lineage["teachers"][0]["run_id"] == v1.run_id
    assert lineage["teachers"][0]["weights_sha256"] == teacher["weights_sha256"]

    run_id = json.loads((project / "models/fine_tuned/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["graft.teacher"] == "graft-classifier v1"
    assert run.data.tags["graft.teacher_weights_sha256"] == teacher["weights_sha256"]
    assert run.data.params["distill.teacher"] == "champion"
    v2 = client.get_model_version("graft-classifier", "2")
    assert v2.tags["graft.teacher"] == "graft-classifier v1" and v2.tags["graft.teacher_run_id"] == teacher["training_run_id"]
    assert "distilled from graft-classifier v1" in v2.description

    # Serving cost: evaluate measured it for the student (and logged it); register measured
    # student and champion side by side for the decision.
    serving = json.loads((project / "reports/evaluate/serving.json").read_text())
    assert serving["latency_ms_b1"] > 0 and serving["throughput_b64"] > 0
    assert serving["parameters"] < 1e6 and serving["size_mb"] < 4
    assert run.data.metrics["serving_latency_ms_b1"] == pytest.approx(serving["latency_ms_b1"])
    decision = json.loads((project / "reports/register/decision.json").read_text())
    assert decision["version"] == "2" and decision["champion_version"] == "1"
    assert decision["candidate_serving"]["latency_ms_b1"] > 0 and decision["champion_serving"]["latency_ms_b1"] > 0

    status = subprocess.run([sys.executable, "-m", "flows.cli", "status"], cwd=project, env=project_env(project),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "distilled from v1" in status.stdout


def test_the_students_hyperparameters_never_rerun_the_teacher(distilled):
    from flows.pipeline import stale_stages

    project = distilled
    before = (project / "params.yaml").read_text()
    set_params(project, distill={"alpha": 0.5}, fine_tune={"lr": 0.001})
    try:
        assert stale_stages(project) == ["fine_tune"]  # DVC's own view; what depends on it follows
        set_params(project, distill={"teacher": "graft-classifier/1"})
        assert "teach" in stale_stages(project)
    finally:
        (project / "params.yaml").write_text(before)
    assert stale_stages(project) == []


def teach(project, teacher, monkeypatch, capsys, out_name="bad-teacher-out"):
    """The teach stage's main, in this process (its refusals import nothing new), on a
    params file naming ``teacher``: (exit code, stderr)."""
    import yaml

    from stages.teach import main

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"]["teacher"] = teacher
    path = project / "params-bad-teacher.yaml"
    path.write_text(yaml.safe_dump(params))
    out = project / out_name
    with monkeypatch.context() as m:
        m.chdir(project)
        for key, value in project_env(project).items():
            m.setenv(key, value)
        capsys.readouterr()
        try:
            main(["--raw", "data/raw", "--prepared", "data/prepared", "--out", str(out),
                  "--report", str(project / "bad-teacher.json"), "--params", str(path)])  # fmt: skip
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    if code != 0:
        assert not out.exists()  # nothing written, not even half
    return code, err


def test_an_ensemble_of_a_registered_model_and_a_model_folder(distilled, monkeypatch, capsys):
    """Two teachers of different kinds: one pass over the snapshot, one logits column each."""
    project = distilled
    code, err = teach(project, ["graft-classifier/1", str(project / "models/pretrained")], monkeypatch, capsys, "ensemble")
    assert code == 0, err
    info = json.loads((project / "ensemble/teacher.json").read_text())
    assert [t.get("version") for t in info["teachers"]] == ["1", None]
    assert info["teachers"][1]["model_dir"] == str((project / "models/pretrained").resolve())
    logits = np.load(project / "ensemble/logits.npy")
    single = np.load(project / "data/teacher/logits.npy")
    assert logits.shape == (single.shape[0], 2, 10)
    np.testing.assert_allclose(logits[:, 0], single[:, 0], rtol=1e-5, atol=1e-5)  # v1 is the champion of the main run
    assert not np.allclose(logits[:, 1], logits[:, 0])


def test_a_bad_teacher_is_refused_before_any_training(distilled, tmp_path, monkeypatch, capsys):
    project = distilled
    code, err = teach(project, "graft-classifier/99", monkeypatch, capsys)
    assert code == 2 and "registered model 'graft-classifier' has no version 99" in err and "graft status" in err
    code, err = teach(project, "no-such-alias", monkeypatch, capsys)
    assert code == 2 and "no version with alias 'no-such-alias'" in err
    code, err = teach(project, str(tmp_path / "missing"), monkeypatch, capsys)
    assert code == 2 and "no such model directory" in err

    # A teacher of other classes: the pretrained model with one class renamed.
    other = tmp_path / "other-classes"
    shutil.copytree(project / "models/pretrained", other)
    cfg = json.loads((other / "model.json").read_text())
    cfg["classes"][0] = "Jacket"
    (other / "model.json").write_text(json.dumps(cfg))
    code, err = teach(project, str(other), monkeypatch, capsys)
    assert code == 2 and "trained on other classes" in err and "Jacket" in err and "T-shirt/top" in err

    # A teacher that cannot be loaded: its weights file is damaged.
    broken = tmp_path / "broken"
    shutil.copytree(project / "models/pretrained", broken)
    (broken / "weights.pt").write_bytes(b"not a checkpoint")
    code, err = teach(project, str(broken), monkeypatch, capsys)
    assert code == 2 and "cannot be loaded" in err and str(broken) in err
