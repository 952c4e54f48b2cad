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
