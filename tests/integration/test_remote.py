"""A DVC remote as graft's shared storage, with real DVC, Prefect (test server) and MLflow:
a run pushes what it produced; a fresh clone of the same commit restores every stage
from the remote and trains nothing; a push that fails is reported, leaves the model
registered, and the next run pushes again."""

import json
import subprocess

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import dvc, requires_fashion_mnist, set_params
from tests.integration.test_flow_registry import TINY

pytestmark = [pytest.mark.slow, requires_fashion_mnist]

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def files_under(path):
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_push_then_a_fresh_clone_restores_from_the_remote(prefect_harness, project_run_env, tmp_path, monkeypatch):
    import mlflow

    from flows.training import training_pipeline
    from stages import registry

    project = project_run_env
    set_params(project, **TINY)
    storage = tmp_path / "remote-storage"
    assert dvc(project, "remote", "add", "-d", "shared", str(storage)).returncode == 0
    first = training_pipeline(project_dir=str(project))
    assert set(first["stages"].values()) == {"ran"}
    assert first["remote"]["ok"] and first["remote"]["remote"] == "shared" and "pushed" in first["remote"]["message"]
    pushed = files_under(storage)
    assert any("runs" in p.parts for p in pushed)  # DVC's run-cache went too
    assert dvc(project, "status", "--cloud").stdout.strip().startswith(("Cache and remote", "Data and pipelines"))
    status = CliRunner().invoke(app, ["status", "--project", str(project)])
    assert f"DVC remote: 'shared' ({storage})" in status.output and "last push" in status.output

    # A teammate: a fresh clone of that commit (code, params, dvc.lock, reports) on the
    # same MLflow registry, with an empty DVC cache and no data.
    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", "trained"], cwd=project, check=True)
    clone = tmp_path / "teammate"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "data/prepared").exists() and not (clone / ".dvc/cache").exists()
    client = mlflow.MlflowClient()
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    second = training_pipeline(project_dir=str(clone))
    assert set(second["stages"].values()) == {"pulled"}, second["stages"]
    assert (clone / "models/fine_tuned/weights.pt").read_bytes() == (project / "models/fine_tuned/weights.pt").read_bytes()
    assert len(client.search_model_versions("name='graft-classifier'")) == 1
    assert str(registry.alias_version(client, "graft-classifier", "champion").version) == "1"
    # Nothing trained: no run was created in MLflow at all.
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before

    # The remote breaks (its path is now under a file): the run registers its model, says
    # the push failed and how to fix it, and the next run pushes again.
    monkeypatch.setenv("GRAFT_USER", "ci-bot")
    broken = tmp_path / "not-a-directory"
    broken.write_text("")
    assert dvc(project, "remote", "modify", "shared", "url", str(broken / "store")).returncode == 0
    third = training_pipeline(project_dir=str(project), overrides=["fine_tune.seed=3"])
    assert third["stages"]["fine_tune"] == "ran" and third["decision"]["version"] == "2"
    assert not third["remote"]["ok"] and "DVC remote 'shared'" in third["remote"]["message"]
    assert "dvc push --run-cache" in third["remote"]["message"]
    assert json.loads((project / ".graft/remote.json").read_text())["ok"] is False
    status = CliRunner().invoke(app, ["status", "--project", str(project)])
    assert "last push FAILED" in status.output
    assert dvc(project, "remote", "modify", "shared", "url", str(storage)).returncode == 0
    fourth = training_pipeline(project_dir=str(project))
    assert set(fourth["stages"].values()) == {"cached"} and fourth["remote"]["ok"]
    assert len(files_under(storage)) > len(pushed)  # v2's model and its run-cache entry
    assert dvc(project, "status", "--cloud").returncode == 0


def test_an_ssh_remote_carries_the_bytes_through_a_real_sshd(sshd, project, tmp_path, monkeypatch):
    """DVC over SSH (dvc-ssh) to an sshd on loopback with key authentication: graft's push
    writes into the remote user's home (the files are that user's: sshd wrote them), and
    a fresh clone pulls every stage that ran back from it."""
    import logging
    import pwd

    from flows import remote
    from flows.training import stale_stages

    monkeypatch.setenv("HOME", str(sshd.client_home))  # its known_hosts trusts the test server
    set_params(project, **TINY)
    res = dvc(project, "repro", "load_pretrained", check=False)  # ingest to load_pretrained: no training
    assert res.returncode == 0, res.stderr[-2000:]
    assert dvc(project, "remote", "add", "-d", "team", sshd.url("dvc-store")).returncode == 0
    assert dvc(project, "remote", "modify", "--local", "team", "keyfile", str(sshd.key)).returncode == 0
    logger = logging.getLogger("test_remote")
    state = remote.push(project, logger)
    assert state["ok"], state["message"]
    stored = files_under(sshd.home / "dvc-store")
    assert stored and {p.stat().st_uid for p in stored} == {pwd.getpwnam(sshd.user).pw_uid}

    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", "prepared"], cwd=project, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / ".dvc/config.local").exists()  # the credentials stay on the machine that set them
    assert dvc(clone, "remote", "modify", "--local", "team", "keyfile", str(sshd.key)).returncode == 0
    restored = remote.pull(clone, stale_stages(clone), logger)
    assert set(restored) == {"ingest", "validate", "preprocess", "load_pretrained"}
    assert (clone / "data/prepared/train_x.npy").read_bytes() == (project / "data/prepared/train_x.npy").read_bytes()

    # A wrong key: the message names the remote and what to do, and nothing local is lost.
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    assert dvc(project, "remote", "modify", "--local", "team", "keyfile", str(wrong)).returncode == 0
    state = remote.push(project, logger)
    assert not state["ok"] and "DVC remote 'team'" in state["message"] and "dvc remote modify --local team" in state["message"]
    assert (project / "data/prepared/train_x.npy").exists()
