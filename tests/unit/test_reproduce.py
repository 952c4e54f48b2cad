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



def test_the_verdict_names_what_ran_the_training_differently():
    """The environment rows explain a verdict and never decide it; the line under it names
    the one that differs (kernel set, thread schedule, torch version)."""
    from flows.reproduce import Lineage

    lineage = Lineage(name="m", version="1", commit="c", training_run_id="r", evaluation_run_id="r", params_yaml=b"",
                      lock={}, diff=None, pretrained_sha256="s", weights_sha256="w", metrics={},
                      cpu_kernels="AVX512", threads="2; 1 after 37 steps", torch="2.14.1")  # fmt: skip
    tags = {"graft.cpu_kernels": "AVX512", "graft.threads": "2; 1 after 37 steps", "graft.torch": "2.14.1"}
    env = rep.environment_rows(lineage, tags)
    assert [r.status for r in env] == [IDENTICAL] * 3
    inputs = [Row("data data/raw", "a", "a", IDENTICAL)]
    same = [Row("fine-tuned weights sha256", "w", "w", IDENTICAL), Row("test accuracy", "0.9", "0.9", IDENTICAL)]
    assert rep.verdict(inputs + same + env) == IDENTICAL and rep.why_weights_differ(inputs + same + env) is None
    # A count forced for the rerun: the row differs and the line says so.
    forced = rep.environment_rows(lineage, {**tags, "graft.threads": "1 (forced)"})
    close = [Row("fine-tuned weights sha256", "w", "v", DIFFERS), Row("test accuracy", "0.9", "0.901", WITHIN)]
    assert rep.verdict(inputs + close + forced) == WITHIN
    why = rep.why_weights_differ(inputs + close + forced)
    assert why is not None and "torch threads 2; 1 after 37 steps -> 1 (forced)" in why and "CPU kernels" not in why
    # "2 (forced)" ran the same pool as "2"; another torch is named.
    steady = Lineage(**{**lineage.__dict__, "threads": "2"})
    other = rep.environment_rows(steady, {**tags, "graft.threads": "2 (forced)", "graft.torch": "2.15.0"})
    assert [r.status for r in other] == [IDENTICAL, IDENTICAL, DIFFERS]
    assert "torch version 2.14.1 -> 2.15.0" in (rep.why_weights_differ(inputs + close + other) or "")
    # Nothing in the environment differs: another CPU model, said so.
    assert "CPU model" in (rep.why_weights_differ(inputs + close + env) or "")


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


def test_the_rerun_trains_at_the_recorded_thread_schedule():
    """The same seeded training gives other weights at another thread count, so the rerun
    replays the pool's sizes on the training run's tag, as ThreadSizer.describe() wrote them."""
    from graft.base import threads

    said = []
    steady = threads.ThreadSizer()
    steady.schedule = [(0, 2)]
    assert threads.recorded_pool(steady.describe()) == (2, False)
    assert rep.thread_pin(steady.describe(), None, said.append) == {"GRAFT_THREADS": "2"}
    assert "torch threads: 2, as at training" in said[-1]
    forced = threads.ThreadSizer(forced=1)
    forced.schedule = [(0, 1)]
    assert rep.thread_pin(forced.describe(), "1", said.append) == {"GRAFT_THREADS": "1"}
    # A pool re-sized to the machine's load is replayed step for step.
    resized = threads.ThreadSizer()
    resized.schedule = [(0, 2), (37, 1), (120, 2)]
    assert resized.describe() == "2; 1 after 37 steps; 2 after 120 steps"
    assert threads.recorded_schedule(resized.describe()) == resized.schedule
    assert rep.thread_pin(resized.describe(), None, said.append) == {"GRAFT_THREAD_SCHEDULE": resized.describe()}
    assert "replayed step for step" in said[-1]
    # A record in seconds (before graft kept the steps) cannot be: pinned to its first size, and said so.
    legacy = "2; 1 at 35 s (1.1 CPU busy elsewhere); 2 at 120 s (0.1 CPU busy elsewhere)"
    assert threads.recorded_schedule(legacy) is None
    assert rep.thread_pin(legacy, None, said.append) == {"GRAFT_THREADS": "2"}
    assert "within tolerance" in said[-1] and "1 at 35 s" in said[-1]
    # The user's own count wins; nothing recorded (older versions): nothing pinned.
    assert rep.thread_pin(steady.describe(), "1", said.append) == {} and "GRAFT_THREADS forces" in said[-1]
    assert rep.thread_pin(resized.describe(), "2", said.append) == {} and "GRAFT_THREADS forces" in said[-1]
    assert rep.thread_pin(None, None, said.append) == {} and threads.recorded_pool("unset") is None
