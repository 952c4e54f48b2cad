"""graft reproduce's pure parts: which version a reference names, and the verdict."""

import pytest

from flows import reproduce as rep
from flows.reproduce import DIFFERS, IDENTICAL, WITHIN, Row


def test_references_name_a_version(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias("m", "champion", "2")
    assert rep.resolve_ref(client, "m", "champion") == ("m", "2")
    assert rep.resolve_ref(client, "other", "m@champion") == ("m", "2")
    assert rep.resolve_ref(client, "other", "m/1") == ("m", "1")
    assert rep.resolve_ref(client, "m", "1") == ("m", "1")
    with pytest.raises(rep.CannotReproduce, match="'m' has no version 7"):
        rep.resolve_ref(client, "m", "7")
    with pytest.raises(rep.CannotReproduce, match="'m' has no alias 'challenger'"):
        rep.resolve_ref(client, "m", "challenger")


def test_verdict_is_identical_within_tolerance_or_differs():
    inputs = [Row("data data/raw", "a", "a", IDENTICAL), Row("pretrained weights sha256", "s", "s", IDENTICAL)]
    same = [Row("fine-tuned weights sha256", "w", "w", IDENTICAL), Row("test accuracy", "0.9", "0.9", IDENTICAL)]
    assert rep.verdict(inputs + same) == IDENTICAL
    # Other hardware: weights differ in their last bits, figures within tolerance.
    close = [Row("fine-tuned weights sha256", "w", "v", DIFFERS), Row("test accuracy", "0.9", "0.901", WITHIN)]
    assert rep.verdict(inputs + close) == WITHIN
    assert rep.verdict(inputs + [Row("test accuracy", "0.9", "0.8", DIFFERS)]) == DIFFERS
    # An input that differs is never "within tolerance", whatever the figures say.
    assert rep.verdict([Row("data data/raw", "a", "b", DIFFERS)] + close) == DIFFERS
    assert rep._figure("test ece", 0.05, 0.052, rep.TOLERANCE["ece"]).status == WITHIN
    assert rep._figure("test ece", 0.05, 0.06, rep.TOLERANCE["ece"]).status == DIFFERS
    assert rep._figure("test ece", None, 0.06, rep.TOLERANCE["ece"]).status == DIFFERS
    assert all(len(line) < 120 for line in rep.table(inputs + close))


def test_lineage_carries_the_diff_of_a_dirty_tree_and_names_untracked_sources(tmp_path, capsys):
    import subprocess

    import mlflow

    from graft.tracking import runs as tracking

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.py").write_text("x = 1\n")
    (tmp_path / "params.yaml").write_text("fine_tune:\n  lr: 0.1\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    (tmp_path / "stages" / "a.py").write_text("x = 2\n")  # uncommitted
    (tmp_path / "stages" / "helper.py").write_text("y = 1\n")  # untracked: no diff carries it
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        untracked = tracking.log_lineage(tmp_path / "params.yaml", tmp_path)
    assert untracked == ["stages/helper.py"] and "stages/helper.py" in capsys.readouterr().out
    folder = tmp_path / "artifacts" / run.info.run_id / "artifacts" / "lineage"
    assert (folder / "params.yaml").read_text() == "fine_tune:\n  lr: 0.1\n"
    diff = (folder / "git.diff").read_text()
    assert "-x = 1" in diff and "+x = 2" in diff
    mlflow.set_tracking_uri(None)


def test_the_rerun_trains_at_the_recorded_thread_count():
    """The same seeded training gives other weights at another thread count, so the rerun
    is pinned to the count on the training run's tag, as ThreadSizer.describe() wrote it."""
    from graft.base import threads

    said = []
    steady = threads.ThreadSizer()
    steady.changes = [(0.0, 2, 0.0)]
    assert threads.recorded_pool(steady.describe()) == (2, False)
    assert rep.thread_pin(steady.describe(), None, said.append) == {"GRAFT_THREADS": "2"}
    assert "torch threads: 2, as at training" in said[-1]
    forced = threads.ThreadSizer(forced=1)
    forced.changes = [(0.0, 1, 0.0)]
    assert rep.thread_pin(forced.describe(), "1", said.append) == {"GRAFT_THREADS": "1"}
    # A pool re-sized to the machine's load cannot be replayed batch for batch: pinned to
    # its first size, and said so.
    resized = threads.ThreadSizer()
    resized.changes = [(0.0, 2, 0.0), (35.0, 1, 1.1), (120.0, 2, 0.1)]
    assert threads.recorded_pool(resized.describe()) == (2, True)
    assert rep.thread_pin(resized.describe(), None, said.append) == {"GRAFT_THREADS": "2"}
    assert "within tolerance" in said[-1] and "1 at 35 s" in said[-1]
    # The user's own count wins; nothing recorded (older versions): nothing pinned.
    assert rep.thread_pin(steady.describe(), "1", said.append) == {} and "GRAFT_THREADS forces" in said[-1]
    assert rep.thread_pin(None, None, said.append) == {} and threads.recorded_pool("unset") is None
