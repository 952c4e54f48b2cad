"""End to end through the Prefect flow, with a real Prefect server (test harness), real
DVC and real MLflow (SQLite under the project copy), on a tiny Fashion-MNIST slice."""

import csv
import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import dvc, requires_fashion_mnist, set_params
from tests.integration.conftest import prefect_task_runs

pytestmark = [pytest.mark.slow, requires_fashion_mnist]

TINY = dict(
    ingest={"max_train_per_class": 16, "max_test_per_class": 4},
    preprocess={"image_size": 32},
    fine_tune={"epochs": 2, "batch_size": 16, "mode": "partial", "frozen_groups": 4, "lr": 0.003},
    register={"min_accuracy": 0.3, "min_improvement": 0.0},
)
cli = CliRunner()
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def graft(project, *args):
    result = cli.invoke(app, [*args, "--project", str(project)])
    return result


def registry(project):
    import mlflow

    from graft.registry import rules as reg

    client = mlflow.MlflowClient()
    return client, reg


def test_flow_registers_promotes_and_rolls_back(prefect_harness, project_run_env, tmp_path, monkeypatch):
    from flows.training import training_pipeline
    from graft.tracking import runs as tracking

    project = project_run_env
    set_params(project, **TINY)
    monkeypatch.setenv("GRAFT_USER", "ci-bot")  # who moves aliases, as the history records it
    storage = tmp_path / "remote-storage"  # the team's DVC remote: a directory (a shared disk)
    assert dvc(project, "remote", "add", "-d", "shared", str(storage)).returncode == 0

    # 1. The first run trains and registers version 1 as champion, then pushes what it
    # produced to the DVC remote, run-cache included.
    first = training_pipeline(project_dir=str(project))
    assert set(first["stages"].values()) == {"ran"}
    assert first["remote"]["ok"] and first["remote"]["remote"] == "shared" and "pushed" in first["remote"]["message"]
    pushed = files_under(storage)
    assert any("runs" in p.parts for p in pushed)  # DVC's run-cache went too
    assert "in sync" in dvc(project, "status", "--cloud").stdout
    assert first["decision"]["version"] == "1" and first["decision"]["alias"] == "champion"
    client, reg = registry(project)
    v1 = reg.alias_version(client, "graft-classifier", "champion")
    assert str(v1.version) == "1"
    for tag in ("git_commit", "data_version", "params_hash", "mlflow_run_id", "prefect_flow_run_id", "test_accuracy"):
        assert v1.tags.get(tag), tag
    assert v1.tags["prefect_flow_run_id"] == first["flow_run_id"]
    # The pipeline's run nests under the flow's parent run, and both are in the `graft`
    # experiment (not MLflow's "Default"), with their artifacts in mlruns/artifacts.
    run = client.get_run(v1.tags["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == first["mlflow_parent_run_id"]
    graft_exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert run.info.experiment_id == graft_exp.experiment_id != "0"
    assert client.get_run(first["mlflow_parent_run_id"]).info.experiment_id == graft_exp.experiment_id
    assert run.info.artifact_uri.startswith((project / "mlruns" / "artifacts").as_uri())
    assert client.search_runs(["0"]) == []
    assert run.data.tags["mlflow.source.git.commit"] == v1.tags["git_commit"]
    # The data the model saw, as MLflow datasets with the DVC hash as digest.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    assert {d.dataset.digest for d in inputs.values()} == {v1.tags["data_version"].removesuffix(".dir")}
    assert {t.value for t in inputs["test"].tags} >= {"testing"}
    # Per-epoch series and one-off summaries have different names: no chart mixes them.
    assert len(client.get_metric_history(run.info.run_id, "samples_per_second")) == 2
    assert len(client.get_metric_history(run.info.run_id, "fit_samples_per_second_mean")) == 1
    # A readable description on the version; the alias move records who made it.
    assert "Test metrics: accuracy" in v1.description and v1.tags["git_commit"] in v1.description
    assert reg.history(client, "graft-classifier")[0]["user"] == "ci-bot"
    # Prefect: the task runs carry DVC's edges, and the flow run publishes its summary.
    tasks, artifacts = prefect_task_runs(first["flow_run_id"])
    assert set(tasks) == set(first["stages"])
    waits = {name: {i.id for i in t.task_inputs.get("wait_for", [])} for name, t in tasks.items()}
    assert waits["evaluate"] == {tasks["fine_tune"].id, tasks["preprocess"].id, tasks["ingest"].id}
    assert waits["fine_tune"] == {tasks["load_pretrained"].id, tasks["preprocess"].id, tasks["teach"].id, tasks["drift"].id}
    assert waits["ingest"] == set() and waits["validate"] == {tasks["ingest"].id}
    summary_md = next(a for a in artifacts if a.key == "graft-run-summary").data
    assert "graft run: done" in summary_md and run.info.run_id in summary_md and "v1 is **champion**" in summary_md

    # 2. graft predict on a folder: one row per image, same classes as graft's own evaluation.
    folder = tmp_path / "test_images"
    folder.mkdir()
    ids = [str(i) for i in np.load(project / "data/prepared/test_ids.npy")]
    with tarfile.open(project / "data/raw/samples.tar") as tar:
        for m in tar:
            if m.name.split(".")[0] in ids:
                (folder / m.name).write_bytes(tar.extractfile(m).read())
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    out = tmp_path / "pred.csv"
    res = graft(project, "predict", str(folder), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert f"{len(ids) + 1} image(s): {len(ids)} classified" in res.output and "1 could not be decoded" in res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(ids) + 1
    broken = rows.pop()
    assert broken["path"].endswith("zz_broken.png") and broken["class"] == "" and broken["error"]
    ours = {r["id"]: r for r in csv.DictReader((project / "reports/evaluate/predictions.csv").open())}
    for r in rows:
        sample = r["path"].rsplit("/", 1)[1].split(".")[0]
        assert r["class"] == ours[sample]["predicted"]
        assert float(r["probability"]) == pytest.approx(float(ours[sample]["confidence"]), abs=1e-4)

    # A teammate: a fresh clone of this commit (code, params, dvc.lock) on the same
    # registry, with an empty DVC cache and no data, restores every stage from the remote
    # and trains nothing (no MLflow run at all).
    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", "trained"], cwd=project, check=True)
    clone = tmp_path / "teammate"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "data/prepared").exists() and not (clone / ".dvc/cache").exists()
    all_runs = lambda: client.search_runs([e.experiment_id for e in client.search_experiments()])  # noqa: E731
    runs_before = len(all_runs())
    restored = training_pipeline(project_dir=str(clone))
    assert set(restored["stages"].values()) == {"pulled"}, restored["stages"]
    assert (clone / "models/fine_tuned/weights.pt").read_bytes() == (project / "models/fine_tuned/weights.pt").read_bytes()
    assert len(all_runs()) == runs_before and len(client.search_model_versions("name='graft-classifier'")) == 1
    assert restored["remote"]["ok"]

    # Another teammate's clone holds a dvc.lock committed from a machine that never pushed:
    # the same inputs, another fine-tuned model (its md5 everywhere the lock names it),
    # which no cache or remote has. DVC alone would take that lock's entry and retrain; the
    # remote's run-cache has this very stage run, so it is restored and nothing trains.
    clone2 = tmp_path / "teammate2"
    subprocess.run(["git", "clone", "-q", str(project), str(clone2)], check=True)
    ours = lock_md5(clone2, "fine_tune", "models/fine_tuned")
    elsewhere = "0123456789abcdef0123456789abcdef.dir"  # an output on no cache and no remote
    (clone2 / "dvc.lock").write_text((clone2 / "dvc.lock").read_text().replace(ours, elsewhere))
    assert lock_md5(clone2, "fine_tune", "models/fine_tuned") == elsewhere
    stage_runs = lambda: [r for r in all_runs() if r.data.tags.get("graft.kind") != "flow"]  # noqa: E731
    stage_runs_before = len(stage_runs())
    past_lock = training_pipeline(project_dir=str(clone2))
    assert past_lock["stages"]["fine_tune"] == "restored", past_lock["stages"]
    assert set(past_lock["stages"].values()) <= {"pulled", "restored", "cached"}, past_lock["stages"]  # nothing ran
    assert (clone2 / "models/fine_tuned/weights.pt").read_bytes() == (project / "models/fine_tuned/weights.pt").read_bytes()
    assert lock_md5(clone2, "fine_tune", "models/fine_tuned") == ours  # the lock now names what is there
    logs = prefect_logs(past_lock["flow_run_id"])
    assert "neither locally nor on remote" not in logs and "name: models/fine_tuned" not in logs  # DVC's per-file list
    assert "restored from DVC's run-cache" in logs, logs[-3000:]
    assert len(stage_runs()) == stage_runs_before and len(client.search_model_versions("name='graft-classifier'")) == 1

    # 3. Nothing changed: every stage is cached and nothing new is registered.
    second = training_pipeline(project_dir=str(project))
    assert set(second["stages"].values()) == {"cached"}
    assert len(client.search_model_versions("name='graft-classifier'")) == 1

    # The remote breaks (its path now runs under a file) before the next run.
    (tmp_path / "a-file").write_text("")
    assert dvc(project, "remote", "modify", "shared", "url", str(tmp_path / "a-file" / "store")).returncode == 0

    # 4. A worse model (a learning rate too small to learn) stays challenger.
    third = training_pipeline(project_dir=str(project), overrides=["fine_tune.lr=0.0000001", "fine_tune.epochs=1"])
    assert third["stages"]["fine_tune"] == "ran" and third["stages"]["ingest"] == "cached"
    assert third["decision"]["version"] == "2" and third["decision"]["alias"] == "challenger"
    assert third["decision"]["champion_accuracy"] > third["decision"]["candidate_accuracy"]
    assert str(reg.alias_version(client, "graft-classifier", "champion").version) == "1"
    assert str(reg.alias_version(client, "graft-classifier", "challenger").version) == "2"
    assert "replaces" not in third["decision"]["reason"]
    # The push failed: the run still succeeded with its model registered, and says where
    # and what to do; `graft status` says so too. The next run pushes again.
    assert not third["remote"]["ok"] and "DVC remote 'shared'" in third["remote"]["message"]
    assert "dvc push --run-cache" in third["remote"]["message"]
    res = graft(project, "status")
    assert f"DVC remote: 'shared' ({tmp_path / 'a-file' / 'store'})" in res.output and "last push FAILED" in res.output
    assert "1 run(s) waiting to be pushed" in third["remote"]["message"]
    v2_model = lock_md5(project, "fine_tune", "models/fine_tuned")  # referenced by v2, on no remote yet
    assert dvc(project, "remote", "modify", "shared", "url", str(storage)).returncode == 0
    assert "in sync" not in dvc(project, "status", "--cloud").stdout

    # 5. Another losing candidate (still the tiny learning rate) takes the challenger alias,
    # and says so. Its two-epoch training is killed (SIGKILL) once, right after epoch 1's
    # checkpoint: Prefect retries the stage, which resumes from the checkpoint (epoch 2
    # only) and ends with the weights of an uninterrupted run.
    fired = tmp_path / "fault-fired"
    monkeypatch.setenv("GRAFT_FAULT_POINT", "fine_tune_after_epoch_1")
    monkeypatch.setenv("GRAFT_FAULT_ONCE", str(fired))
    fourth = training_pipeline(project_dir=str(project), overrides=["fine_tune.seed=7", "fine_tune.epochs=2"])
    monkeypatch.delenv("GRAFT_FAULT_POINT")
    assert fired.exists()  # the stage really was killed
    assert fourth["decision"]["version"] == "3" and fourth["decision"]["alias"] == "challenger"
    assert fourth["decision"]["replaces_challenger"] == "2" and "v3 replaces v2 as challenger" in fourth["decision"]["reason"]
    assert fourth["remote"]["ok"] and "in sync" in dvc(project, "status", "--cloud").stdout
    # v2's model, replaced in the workspace before any push worked, went with this push too.
    assert lock_md5(project, "fine_tune", "models/fine_tuned") != v2_model
    manifest = storage / "files/md5" / v2_model[:2] / v2_model[2:]
    assert manifest.is_file()  # and every file of the directory with it, not the manifest alone
    assert all((storage / "files/md5" / e["md5"][:2] / e["md5"][2:]).is_file() for e in json.loads(manifest.read_text()))
    assert not list((project / ".graft/unpushed").glob("*"))
    tasks, _ = prefect_task_runs(fourth["flow_run_id"])
    assert tasks["fine_tune"].run_count == 2 and tasks["fine_tune"].state.is_completed()
    logs = prefect_logs(fourth["flow_run_id"])
    assert "fine_tune: resuming after epoch 1" in logs
    run3 = client.get_run(client.get_model_version("graft-classifier", "3").tags["mlflow_run_id"])
    assert [m.step for m in client.get_metric_history(run3.info.run_id, "val_accuracy")] == [1, 2]  # each epoch once
    assert not (project / ".graft/checkpoints/fine_tune.pt").exists()
    resumed = weights(project / "models/fine_tuned")
    res = dvc(project, "repro", "--force", "--single-item", "fine_tune", check=False)  # uninterrupted, same params
    assert res.returncode == 0, res.stderr[-2000:]
    uninterrupted = weights(project / "models/fine_tuned")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    # The gate refuses a worse version; --force promotes it (clearing its challenger alias,
    # recorded); rollback restores v1.
    res = graft(project, "promote", "3")
    assert res.exit_code == 1 and "did not pass the gate" in res.output
    res = graft(project, "promote", "3", "--force", "--reason", "test")
    assert res.exit_code == 0, res.output
    assert str(reg.alias_version(client, "graft-classifier", "champion").version) == "3"
    assert reg.alias_version(client, "graft-classifier", "challenger") is None
    res = graft(project, "rollback")
    assert res.exit_code == 0, res.output
    assert str(reg.alias_version(client, "graft-classifier", "champion").version) == "1"
    moves = [(h["alias"], h["from_version"], h["to_version"]) for h in reg.history(client, "graft-classifier")]
    assert moves == [("champion", None, "1"), ("challenger", None, "2"), ("challenger", "2", "3"),
                     ("champion", "1", "3"), ("challenger", "3", None), ("champion", "3", "1")]  # fmt: skip
    assert {h["user"] for h in reg.history(client, "graft-classifier")} == {"ci-bot"}

    res = graft(project, "status")
    assert res.exit_code == 0 and "champion   v1" in res.output
    table = res.output[res.output.index("alias history"):].splitlines()
    assert table[1].split()[:4] == ["time", "(UTC)", "alias", "from"] and "by" in table[1]
    assert table[-1].split()[2:6] == ["champion", "v3", "v1", "ci-bot"] and "rollback" in table[-1]
    assert any(line.split()[2:5] == ["challenger", "v3", "(removed)"] for line in table)

    # The gate's success path: with the bad v2 forced in, a gated promote of v1 passes,
    # both scored on this workspace's test images.
    assert graft(project, "promote", "2", "--force").exit_code == 0
    res = graft(project, "promote", "1", "--reason", "back to the good one")
    assert res.exit_code == 0, res.output
    assert "beats the champion's" in res.output and "v1 is now champion (was v2)" in res.output
    assert champion_accuracy_line(res.output) > 0.3  # the scored accuracy of v1, printed by the gate
    last = reg.history(client, "graft-classifier")[-1]
    assert (last["to_version"], last["from_version"]) == ("1", "2") and last["reason"].startswith("back to the good one: promoted by hand")


def lock_md5(project, stage, path):
    import yaml

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def files_under(path):
    return sorted(p for p in path.rglob("*") if p.is_file())


def weights(model_dir):
    from graft.models import modeling

    return torch.load(model_dir / modeling.WEIGHTS, map_location="cpu", weights_only=True)


def prefect_logs(flow_run_id) -> str:
    """The flow run's log messages, from the Prefect API (after sending what is queued)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return "\n".join(log.message for log in asyncio.run(read()))


def champion_accuracy_line(output):
    """The candidate's accuracy from the gate's reason ("accuracy 0.4500 beats ...")."""
    import re

    return float(re.search(r"accuracy (\d\.\d+) beats", output).group(1))


def test_validation_failure_stops_the_flow_at_validate(prefect_harness, project_run_env, tmp_path):
    from flows.pipeline import StageFailed
    from flows.training import training_pipeline
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


def test_a_stage_past_its_timeout_is_stopped_with_its_whole_process_group(prefect_harness, project_run_env):
    """graft.yaml's timeout stops the stage and everything it started: here an ingest
    command that starts a child process and then never ends."""
    import time

    import psutil
    import yaml

    from flows.pipeline import StageFailed
    from flows.training import training_pipeline

    project = project_run_env
    set_params(project, **TINY)
    (project / "hang.py").write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "open('hang.pids', 'w').write(f'{os.getpid()} {child.pid}')\n"
        "time.sleep(600)\n"
    )
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    original_cmd, spec["stages"]["ingest"]["cmd"] = spec["stages"]["ingest"]["cmd"], "python hang.py"
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    config = yaml.safe_load((project / "graft.yaml").read_text())
    config["stages"]["ingest"] = {"timeout_seconds": 8, "retries": 0}
    (project / "graft.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    t0 = time.monotonic()
    state = training_pipeline(project_dir=str(project), return_state=True)
    assert state.is_failed() and time.monotonic() - t0 < 120
    with pytest.raises(StageFailed) as e:
        state.result()
    assert e.value.stage == "ingest" and "stages.ingest.timeout_seconds" in str(e.value)
    pids = [int(p) for p in (project / "hang.pids").read_text().split()]
    assert len(pids) == 2

    def gone(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 15
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(p) for p in pids), [p for p in pids if not gone(p)]
    # DVC is left usable (no stale lock): with its real command back, the stage runs.
    spec["stages"]["ingest"]["cmd"] = original_cmd
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = dvc(project, "repro", "--single-item", "ingest", check=False)
    assert res.returncode == 0, res.stderr[-2000:]
