"""kill -9 inside the register stage at each step boundary, then a rerun: the registry
must end consistent. A real subprocess kills itself with SIGKILL at the named step
(GRAFT_FAULT_POINT), against a real MLflow (SQLite under the project copy). Last, on the
same tiny project, the whole pipeline through plain DVC and what it logs."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import copy_project, dvc, project_env, requires_fashion_mnist, set_params
from tests.integration.test_services import webhook  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, requires_fashion_mnist]

TINY = dict(
    ingest={"max_train_per_class": 12, "max_test_per_class": 4},
    preprocess={"image_size": 32},
    fine_tune={"epochs": 2, "batch_size": 16, "mode": "partial", "frozen_groups": 4},
    register={"min_accuracy": 0.0},
)
RESIZED = "1; 2 after 3 steps"  # the trained model's thread pool, step by step
KILL_POINTS = ["after_create", "after_tags", "after_history", "after_alias"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project copy trained up to evaluate, and a worse model (the pretrained one with
    its untrained head) to sit as the first champion."""
    project = copy_project(tmp_path_factory.mktemp("faults") / "project")
    set_params(project, **TINY)
    # The training's pool re-sized mid-epoch, as on a machine that got busy (replayed from a
    # record, so the test does not depend on the load): the reproduce test reruns it.
    res = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=project, capture_output=True, text=True,
                         env={**project_env(project), "GRAFT_THREAD_SCHEDULE": RESIZED})  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    worse = project / "worse_model"
    shutil.copytree(project / "models/pretrained", worse)
    shutil.copy(project / "models/fine_tuned/mlflow_run.json", worse / "mlflow_run.json")
    return project


def register(project, model_name, model_dir, fault=None):
    params = project / f"params-{model_name}.yaml"
    if not params.exists():
        text = (project / "params.yaml").read_text().replace("model_name: graft-classifier", f"model_name: {model_name}")
        params.write_text(text)
    env = project_env(project)
    if fault:
        env["GRAFT_FAULT_POINT"] = fault
    cmd = [sys.executable, "-m", "stages.register", "--model", str(model_dir), "--raw", "data/raw",
           "--prepared", "data/prepared", "--metrics", "reports/evaluate/metrics.json",
           "--decision", f"reports/decision-{model_name}.json", "--params", str(params)]  # fmt: skip
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def client_for(project):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=project_env(project)["MLFLOW_TRACKING_URI"])


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_during_register_then_rerun_leaves_a_consistent_registry(trained, point):
    from graft.registry import rules as registry

    project, name = trained, f"faults-{point.replace('_', '-')}"
    first = register(project, name, project / "worse_model")
    assert first.returncode == 0, first.stderr[-2000:]
    client = client_for(project)
    assert str(registry.alias_version(client, name, "champion").version) == "1"

    killed = register(project, name, project / "models/fine_tuned", fault=point)
    assert killed.returncode == -9, killed.stdout[-1000:] + killed.stderr[-1000:]
    rerun = register(project, name, project / "models/fine_tuned")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "register: repaired:" in rerun.stdout

    versions = client.search_model_versions(f"name='{name}'")
    # Every version that survives has its decision and is ready; nothing is pending.
    for mv in versions:
        assert mv.tags.get(registry.STATE_TAG) == "ready", (mv.version, mv.tags)
        assert json.loads(mv.tags["graft.decision"])["reason"], mv.version
    hist = registry.history(client, name)
    assert all(h["state"] in ("done", "aborted") for h in hist), hist
    # The fine-tuned model beat the untrained head once: exactly one champion move to it,
    # done; the killed attempt either completed (after_alias) or left no trace but an abort.
    champion = str(registry.alias_version(client, name, "champion").version)
    assert champion != "1"
    assert [h["to_version"] for h in hist if h["alias"] == "champion" and h["state"] == "done"] == ["1", champion]
    if point == "after_alias":
        # v2 completed by repair; the rerun ended with that very model: linked to v2, no v3
        assert champion == "2" and len(versions) == 2 and f"{name} v2 again (champion)" in rerun.stdout
    else:
        assert sorted(int(v.version) for v in versions) == [1, 3]  # v2 was deleted, the rerun made v3
    # Rollback goes back to the true previous champion.
    assert registry.champion_stack(hist)[-2:] == ["1", champion]


def test_the_whole_pipeline_logs_one_mlflow_run(trained):
    """The whole pipeline through plain DVC (no Prefect), on the project the fault tests
    trained up to evaluate (it runs last in this module: it changes a param and reruns)."""
    import csv

    import mlflow

    project = trained
    result = dvc(project, "repro", check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("metrics.json", "confusion_matrix.png", "reliability.png", "mistakes/worst_mistakes.png", "predictions.csv"):
        assert (project / "reports/evaluate" / name).is_file(), name
    metrics = json.loads((project / "reports/evaluate/metrics.json").read_text())
    # The headline agrees with the per-image predictions written beside it (the accuracy
    # guard, test_accuracy_guard.py, checks that it is any good).
    rows = list(csv.DictReader((project / "reports/evaluate/predictions.csv").open()))
    assert metrics["n"] == len(rows) == 40
    assert all("t10k-images-idx3-ubyte.gz#" in r["path"] for r in rows), rows[:2]  # the sample as the source names it
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
    # A model-training experiment: MLflow 3's UI opens it on the runs, not on GenAI traces.
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    # set_params edited params.yaml after the copy's commit: the run must say so.
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git_dirty"] == "true"
    assert tags["pretrained_weights_sha256"].startswith("57934424")
    assert tags["data_version"].endswith(".dir")
    assert tags["graft.threads"] == RESIZED and tags["graft.torch"]  # the pool's sizes step by step, and torch's version
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    # One serving-cost figure per version, measured once (by evaluate): the gate's decision and the run agree.
    decision = json.loads((project / "reports/register/decision.json").read_text())
    cost = json.loads((project / "reports/evaluate/serving.json").read_text())
    assert decision["candidate_serving"]["latency_ms_b1"] == cost["latency_ms_b1"] == run.data.metrics["serving_latency_ms_b1"]
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

    # Same params and data: nothing reruns. A new fine_tune (student) param reruns fine_tune and
    # what follows it only: never ingest, preprocess, nor the teacher (teach).
    again = dvc(project, "repro")
    assert "Running stage" not in again.stdout
    set_params(project, fine_tune={"lr": 0.001})  # (test_distill.py changes distill.* the same way)
    third = dvc(project, "repro")
    ran = {line.split("'")[1] for line in third.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"fine_tune", "evaluate", "register"}


def test_reproduce_rebuilds_a_version_after_code_params_and_data_moved_on(trained, prefect_harness, webhook):  # noqa: F811
    """`graft reproduce champion` on a version the whole-pipeline test registered (from a tree
    with uncommitted params: its diff is replayed). Since then a commit changed other code,
    params.yaml was edited and the data re-ingested with another seed; the reproduction
    still rebuilds v1's inputs and gets bit-identical weights and metrics. Then a damaged
    cache object and a missing one: exit 2, naming the input; the scheduled verification
    notifies that one through the webhook."""
    from flows.reproduce import read_lineage
    from flows.verify import verify_champion
    from graft.base import kernels

    project = trained
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (project / "benchmarks" / "report.py").write_text((project / "benchmarks" / "report.py").read_text() + "\n# moved on\n")
    subprocess.run([*git, "commit", "-qam", "unrelated change"], cwd=project, check=True)
    set_params(project, fine_tune={"lr": 0.0015}, ingest={"seed": 7})
    res = dvc(project, "repro", "--single-item", "ingest", check=False)
    assert res.returncode == 0, res.stderr[-2000:]

    def reproduce():  # as a user runs it: no thread count forced (tests/conftest.py forces one)
        env = {k: v for k, v in project_env(project).items() if k != "GRAFT_THREADS"}
        return subprocess.run([sys.executable, "-m", "flows.cli", "reproduce", "champion", "--project", str(project)], cwd=project,
                              env=env, capture_output=True, text=True, timeout=600)  # fmt: skip

    client = client_for(project)
    version = str(client.get_model_version_by_alias("graft-classifier", "champion").version)
    lineage = read_lineage(client, "graft-classifier", version)
    assert lineage.diff and b"params.yaml" in lineage.diff  # trained from a dirty tree
    assert lineage.cpu_kernels == kernels.current()  # fine_tune recorded the CPU kernels it trained with
    raw = next(o for o in lineage.lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert raw["md5"] != next(o for o in dvc_lock(project)["stages"]["ingest"]["outs"] if o["path"] == "data/raw")["md5"]
    aliases = client.get_registered_model("graft-classifier").aliases

    done = reproduce()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"graft-classifier v{version}: identical" in out and "differs" not in out and "Traceback" not in out
    assert "as at training (this CPU has" not in out  # the same CPU: nothing to pin
    # The pool was re-sized during the training: replayed step for step, the same weights.
    assert lineage.threads == RESIZED and f"replayed step for step (GRAFT_THREAD_SCHEDULE={RESIZED})" in out
    for row in ("data data/raw", "data data/prepared", "pretrained weights sha256", "fine-tuned weights sha256", "test accuracy",
                "environment: torch threads", "environment: torch version", "environment: CPU kernels"):
        assert any(line.strip().startswith(row) and line.rstrip().endswith("identical") for line in out.splitlines()), row
    tag = json.loads(client.get_model_version("graft-classifier", version).tags["graft.reproduced"])
    assert tag["verdict"] == "identical"
    rerun = client.get_run(tag["run_id"])
    assert rerun.data.tags["graft.reproduction_of"] == f"graft-classifier/{version}" and rerun.info.run_id != lineage.training_run_id
    assert client.get_registered_model("graft-classifier").aliases == aliases  # the registry's aliases untouched
    assert "reproduced" in subprocess.run([sys.executable, "-m", "flows.cli", "status", "--project", str(project)], cwd=project,
                                          env=project_env(project), capture_output=True, text=True).stdout  # fmt: skip
    assert not (project / ".git" / "worktrees").exists() or not any((project / ".git" / "worktrees").iterdir())

    # One byte of the snapshot's cache object changed: caught before anything trains.
    manifest = json.loads(cache_object(project, raw["md5"]).read_text())
    tar = cache_object(project, next(e["md5"] for e in manifest if e["relpath"] == "samples.tar"))
    original = tar.read_bytes()
    tar.chmod(0o644)
    tar.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    try:
        damaged = reproduce()
    finally:
        tar.write_bytes(original)
    assert damaged.returncode == 2, damaged.stdout[-2000:] + damaged.stderr[-2000:]
    assert "cannot reproduce: data hash mismatch: data/raw/samples.tar" in damaged.stderr
    # The object gone, and no DVC remote: exit 2, saying where it looked and how to fix it.
    hidden = tar.with_name(tar.name + ".away")
    tar.rename(hidden)
    try:
        missing = reproduce()
        verified = verify_champion(project_dir=str(project))
    finally:
        hidden.rename(tar)
    assert missing.returncode == 2 and "is in neither this project's DVC cache nor its DVC remote" in missing.stderr
    assert verified["verdict"] == "cannot reproduce"
    assert [m["event"] for m in webhook.received] == ["reproduction_failed"] and "neither" in webhook.received[0]["reason"]
    assert json.loads(client.get_model_version("graft-classifier", version).tags["graft.reproduced"])["verdict"] == "cannot reproduce"


def dvc_lock(project):
    import yaml

    return yaml.safe_load((project / "dvc.lock").read_text())


def cache_object(project, md5):
    return project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_diff_between_versions_and_against_the_working_copy(trained):
    """After the reproduce test: v1 and v2 differ in one param; the working copy since
    re-ingested its data with another seed and edited params.yaml."""
    project = trained

    def graft_diff(*args):
        res = subprocess.run([sys.executable, "-m", "flows.cli", "diff", *args, "--project", str(project)], cwd=project,
                             env=project_env(project), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        return res.stdout

    versions = json.loads(graft_diff("1", "2", "--json"))
    assert [p["key"] for p in versions["params"]] == ["fine_tune.lr"] and versions["params"][0]["b"] == 0.001
    assert versions["data"]["identical"] and versions["pretrained"]["identical"]
    assert versions["weights"]["identical"] is False and len(versions["weights"]["a"]) == 64  # another lr, other weights
    assert "fine-tuned weights: byte-identical" in graft_diff("1", "1")
    headline = versions["metrics"]["headline"]["accuracy"]
    assert headline["delta"] == pytest.approx(headline["b"] - headline["a"])
    assert set(versions["metrics"]["per_class_f1"]) >= {"Bag", "Sandal"}
    assert versions["paired"]  # scored on this workspace, or says why not

    # The working copy's model and v1 score the same images (this workspace's test split,
    # re-prepared from the re-ingested data): a paired test.
    assert dvc(project, "repro", "--single-item", "preprocess", check=False).returncode == 0
    paired = json.loads(graft_diff("1", "workspace", "--json"))["paired"]
    assert paired["n"] == 40 and 0 <= paired["p_value"] <= 1 and paired["b"] + paired["c"] >= 0
    text = graft_diff("1", "workspace", "--no-score")
    assert "fine_tune.lr: " in text and "ingest.seed: " in text
    assert "files: " in text and " added, " in text and "(identical)" not in text.split("data:")[1].split("\n")[1]
    as_json = json.loads(graft_diff("1", "workspace", "--json", "--no-score"))
    files = as_json["data"]["files"]
    assert files["added"] > 0 and files["removed"] > 0  # another seed drew other images
    assert as_json["paired"] is None
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "diff", "99", "--project", str(project)], cwd=project,
                         env=project_env(project), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "has no version 99" in bad.stderr
