"""`graft rollback` walks back through the champions, never forward, against a real
MLflow registry (SQLite under tmp_path); versions need no model for alias moves."""

import shutil

import pytest
from typer.testing import CliRunner

from flows.cli import app
from graft.registry import rules as registry
from tests.conftest import ROOT

NAME = "graft-classifier"


@pytest.fixture
def project(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the CLI sets it process-wide; an earlier test's URI must not leak in
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    client = mlflow.MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(tmp_path), tags={registry.STATE_TAG: "ready"})
    return tmp_path, client


def graft(project, *args):
    return CliRunner().invoke(app, [*args, "--project", str(project)])


def champion(client):
    return str(registry.alias_version(client, NAME, registry.CHAMPION).version)


def test_second_rollback_goes_further_back_never_forward(project):
    root, client = project
    registry.move_alias(client, NAME, registry.CHAMPION, "1", "first")
    assert graft(root, "promote", "2", "--force").exit_code == 0 and champion(client) == "2"
    res = graft(root, "rollback")
    assert res.exit_code == 0 and "from v2 to v1" in res.output and champion(client) == "1"
    # Once toggled back to v2 (the rejected model); now there is nothing before v1.
    res = graft(root, "rollback")
    assert res.exit_code == 1 and "nothing earlier to roll back to" in res.output and champion(client) == "1"
    # A new promotion stacks on v1; rolling it back returns to v1 again.
    assert graft(root, "promote", "3", "--force").exit_code == 0
    assert graft(root, "rollback").exit_code == 0 and champion(client) == "1"
    kinds = [(h["kind"], h["from_version"], h["to_version"]) for h in registry.history(client, NAME)]
    assert kinds == [("move", None, "1"), ("move", "1", "2"), ("rollback", "2", "1"), ("move", "1", "3"), ("rollback", "3", "1")]


def test_an_interrupted_move_is_settled_from_the_alias(project):
    """A move written ahead but killed before the alias changed is aborted; one killed
    after the alias changed is completed; rollback only trusts completed moves."""
    import json

    root, client = project
    registry.move_alias(client, NAME, registry.CHAMPION, "1", "first")
    ahead = registry._entry(registry.CHAMPION, client.get_model_version(NAME, "1"), "2", "killed", None, "move")
    ahead["time"] = "2026-01-01T00:00:00+00:00"  # long ago: a wreck, not a move under way
    client.set_registered_model_tag(NAME, f"{registry.HISTORY_PREFIX}000001", json.dumps(ahead))
    client.set_model_version_tag(NAME, "3", registry.STATE_TAG, "pending")  # created seconds ago
    res = graft(root, "status")
    assert res.exit_code == 0 and "recorded as aborted" in res.output
    # status leaves a young pending version alone (it may be a registration under way) ...
    assert "v3 being registered (or interrupted" in res.output
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3
    # ... which the next register, serialised by the project's locks, settles at once.
    assert registry.repair(client, NAME) == ["v3: registration was interrupted before its alias was set; version deleted"]
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{NAME}'")) == ["1", "2"]
    assert [h["state"] for h in registry.history(client, NAME)] == ["done", "aborted"]
    assert graft(root, "rollback").exit_code == 1  # v1 is still the only champion that ever was


def test_predict_names_what_the_registry_holds_when_the_model_is_not_there(project, tmp_path):
    """A model name that points nowhere is refused before anything loads, with the
    versions and aliases that do exist and the option that picks one."""
    root, client = project
    images = tmp_path / "images"
    images.mkdir()
    res = graft(root, "predict", str(images))  # no champion yet
    assert res.exit_code == 1, res.output
    assert "has no champion: no version holds an alias (versions v1, v2, v3)" in res.output
    assert "--model 3" in res.output and "graft promote" in res.output
    registry.move_alias(client, NAME, registry.CHALLENGER, "2", "test")
    res = graft(root, "predict", str(images))
    assert res.exit_code == 1 and "challenger is v2" in res.output and "--model challenger" in res.output, res.output
    res = graft(root, "predict", str(images), "--model", "9", "--out", str(root / "out.csv"))
    assert res.exit_code == 1 and "has no version 9; it has v1, v2, v3" in res.output, res.output
    assert not (root / "out.csv").exists()


def test_a_champion_moved_outside_graft_is_flagged_and_the_description_reads(project):
    """MLflow's own alias buttons bypass the gate: `graft status` says so. The registered
    model's description is a readable summary that follows the moves."""
    root, client = project
    registry.move_alias(client, NAME, registry.CHAMPION, "1", "first champion")
    assert registry.moved_outside(client, NAME) is None
    description = client.get_registered_model(NAME).description
    assert "**Champion:** v1" in description and "champion -> v1: first champion" in description
    client.set_registered_model_alias(NAME, registry.CHAMPION, "3")  # as MLflow's UI does: no history entry
    said = registry.moved_outside(client, NAME)
    assert said is not None and "champion points at v3, but graft's history has it at v1" in said
    res = graft(root, "status")
    assert res.exit_code == 0 and "moved outside graft" in res.output, res.output
    client.delete_registered_model_alias(NAME, registry.CHAMPION)
    assert "removed outside graft" in (registry.moved_outside(client, NAME) or "")
