"""The register stage's core against a real MLflow (SQLite under tmp_path): a failure
after the version is created undoes it and leaves the aliases as they were."""

import pytest

from graft.base.errors import GraftError
from graft.config.params import IngestParams, LoadPretrainedParams, PreprocessParams, RegisterParams
from graft.data.snapshot import ingest
from graft.data.splits import preprocess
from graft.models import modeling
from graft.models.pretrained import load_pretrained
from graft.promotion.register import register
from graft.registry import rules as registry
from tests.conftest import make_image_folder

pytestmark = pytest.mark.slow
NAME = "unit-model"


def build_candidate(tmp_path):
    """A two-class image folder ingested and prepared at 32 px, and the pretrained network
    with a new (untrained) head saved as a graft model: a candidate without training."""
    src = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=8)
    raw, prepared, model_dir = tmp_path / "raw", tmp_path / "prepared", tmp_path / "model"
    raw.mkdir(), prepared.mkdir()
    manifest, classes, _ = ingest(IngestParams(source="imagefolder", path=str(src), seed=0), raw)
    pre = PreprocessParams(image_size=32, val_fraction=0.2, test_fraction=0.3, resize="squash", seed=0)
    preprocess(manifest, list(classes), raw / "samples.tar", pre, LoadPretrainedParams("tf_efficientnet_lite0", "packaged:efficientnet_lite0"), prepared)
    model, cfg = load_pretrained(LoadPretrainedParams("tf_efficientnet_lite0", "packaged:efficientnet_lite0"),
                                 prepared, model_dir / "assets", 0)  # fmt: skip
    modeling.save(model_dir, model, cfg)
    return model_dir, raw, prepared


@pytest.fixture
def candidate(tmp_path, monkeypatch):
    import mlflow

    from graft.tracking import runs as tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "unit")
    tracking.configure(tmp_path)
    model_dir, raw, prepared = build_candidate(tmp_path)
    with mlflow.start_run() as run:
        pass
    return model_dir, raw, prepared, run.info.run_id


def test_failure_after_version_created_is_undone(candidate, monkeypatch):
    import mlflow

    model_dir, raw, prepared, run_id = candidate
    params = RegisterParams(model_name=NAME, min_accuracy=0.0, min_improvement=0.0)
    decision, version = register(model_dir, raw, prepared, params, run_id, {"git_commit": "x"}, {"accuracy": 0.5})
    assert decision.promote and version == "1"
    client = mlflow.MlflowClient()

    def broken(*args, **kwargs):
        raise ConnectionError("registry went away")

    monkeypatch.setattr(registry, "move_alias", broken)
    with pytest.raises(GraftError, match=r"(?s)failed: ConnectionError: registry went away.*v2: .*version deleted"):
        register(flipping(model_dir), raw, prepared, params, run_id, {}, {})
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]
    assert str(registry.alias_version(client, NAME, "champion").version) == "1"
    assert registry.alias_version(client, NAME, "challenger") is None
    assert len(registry.history(client, NAME)) == 1


def flipping(model_dir):
    """Another model: the same weights served with test-time flips (another config)."""
    import shutil

    from graft.training.fine_tune import with_tta

    other = model_dir.parent / f"{model_dir.name}-flipping"
    shutil.copytree(model_dir, other)
    model, cfg = modeling.load(other)
    modeling.save(other, model, with_tta(cfg, "hflip"))
    return other


def test_the_very_same_model_is_not_registered_twice(candidate):
    """A rerun that ends with the same weights, config and assets (timings aside) gets no
    second version: register names the version, links the run to it, moves no alias."""
    import json
    import shutil

    import mlflow

    model_dir, raw, prepared, run_id = candidate
    params = RegisterParams(model_name=NAME, min_accuracy=0.0, min_improvement=0.0)
    first, version = register(model_dir, raw, prepared, params, run_id, {}, {"accuracy": 0.5})
    assert first.promote and version == "1" and first.same_as is None
    retrained = model_dir.parent / "retrained"  # the same model, other training timings beside it
    shutil.copytree(model_dir, retrained)
    cfg = json.loads((retrained / "model.json").read_text())
    (retrained / "model.json").write_text(json.dumps({**cfg, "training": {"train_seconds": 123.4}}))
    with mlflow.start_run() as later:
        pass
    again, same = register(retrained, raw, prepared, params, later.info.run_id, {}, {"accuracy": 0.5})
    assert (same, again.same_as, again.same_as_alias, again.promote) == ("1", "1", "champion", False)
    assert "the same model as v1" in again.reason and "linked to v1" in again.reason
    client = mlflow.MlflowClient()
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags[registry.ALSO_TAG] == later.info.run_id and v1.tags[registry.MODEL_TAG] == modeling.identity(model_dir)
    assert len(registry.history(client, NAME)) == 1  # no alias moved
    # Another config with the same weights is another model: a version of its own.
    _, other = register(flipping(model_dir), raw, prepared, params, run_id, {}, {})
    assert other == "2"


def test_the_gate_scores_each_model_at_its_own_preprocessing(candidate):
    """A champion served at another size (a ViT that only accepts 224 px, so feeding it the
    candidate's 32 px would raise) is scored on the same encoded test images, resized its
    own way: the gate's figures equal each model's accuracy at its own preprocessing."""
    from dataclasses import replace

    import numpy as np

    from graft.base import images
    from graft.promotion.gate import load_test_samples

    model_dir, raw, prepared, run_id = candidate
    candidate_model, candidate_cfg = modeling.load(model_dir)
    vit_input = {**candidate_cfg.input, "image_size": 224, "resize": "center_crop", "interpolation": "bilinear"}
    vit_cfg = replace(candidate_cfg, architecture="vit_tiny_patch16_224", input=vit_input,
                      source="scratch:vit_tiny_patch16_224", weights_sha256=None)  # fmt: skip
    vit = modeling.create(vit_cfg)
    champion_dir = model_dir.parent / "vit-champion"
    modeling.save(champion_dir, vit, vit_cfg)
    params = RegisterParams(model_name=NAME, min_accuracy=0.0, min_improvement=0.0)
    first, _ = register(champion_dir, raw, prepared, params, run_id, {}, {})
    assert first.promote
    decision, version = register(model_dir, raw, prepared, params, run_id, {}, {})

    samples = load_test_samples(raw, prepared)
    encoded, truth = list(samples.frame()["image"]), samples.truth

    def accuracy(model, cfg):
        x = np.stack([images.load_rgb_array(b, cfg.input["image_size"], cfg.input["interpolation"], cfg.input["resize"]) for b in encoded])
        predicted = np.asarray(cfg.classes)[modeling.predict_proba(model, x, cfg).argmax(1)]
        return float(np.mean(predicted == np.asarray(truth)))

    with pytest.raises(Exception, match="224"):  # the champion really cannot take 32 px
        modeling.predict_proba(vit.eval(), np.zeros((1, 32, 32, 3), np.uint8), vit_cfg)
    assert decision.n == len(truth)
    assert decision.champion_accuracy == pytest.approx(accuracy(vit.eval(), vit_cfg))
    assert decision.candidate_accuracy == pytest.approx(accuracy(candidate_model, candidate_cfg))


def test_registered_model_flips_at_test_time_by_default_and_on_request_not(candidate):
    """A model trained with fine_tune.tta=hflip serves the mean of each image's and its
    mirror image's probabilities; the pyfunc's `tta` param turns that off per call."""
    import mlflow
    import numpy as np
    from PIL import Image

    from graft.promotion.gate import load_test_samples
    from graft.training.fine_tune import with_tta

    model_dir, raw, prepared, run_id = candidate
    model, cfg = modeling.load(model_dir)
    modeling.save(model_dir, model, with_tta(cfg, "hflip"))
    params = RegisterParams(model_name=NAME, min_accuracy=0.0, min_improvement=0.0)
    decision, version = register(model_dir, raw, prepared, params, run_id, {}, {})
    assert decision.promote
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    frame = load_test_samples(raw, prepared).frame().iloc[:4].reset_index(drop=True)

    def mirrored(data: bytes) -> bytes:
        import io

        out = io.BytesIO()
        Image.open(io.BytesIO(data)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, format="PNG")
        return out.getvalue()

    cols = [f"p_{c}" for c in cfg.classes]
    served = pyfunc.predict(frame)[cols].to_numpy()
    plain = pyfunc.predict(frame, params={"tta": "none"})[cols].to_numpy()
    flipped = pyfunc.predict(frame.assign(image=frame["image"].map(mirrored)), params={"tta": "none"})[cols].to_numpy()
    assert np.allclose(served, (plain + flipped) / 2, atol=1e-5)
    assert not np.allclose(served, plain, atol=1e-4)
    with pytest.raises(Exception, match="tta='vflip'.*none, hflip"):
        pyfunc.predict(frame, params={"tta": "vflip"})


def test_promote_refuses_a_model_of_other_classes_as_register_does(candidate, monkeypatch):
    """One gate: a champion that knows other classes is never scored against this data,
    whether the pipeline's register or `graft promote` asks."""
    import json
    import shutil
    import subprocess

    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from tests.conftest import ROOT

    model_dir, raw, prepared, run_id = candidate
    other = model_dir.parent / "other-classes"
    shutil.copytree(model_dir, other)
    cfg = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**cfg, "classes": ["x", "y"]}))
    params = RegisterParams(model_name=NAME, min_accuracy=0.0, min_improvement=0.0)
    first, _ = register(other, raw, prepared, params, run_id, {}, {})
    assert first.promote  # the first champion: nothing to compare with
    decision, version = register(model_dir, raw, prepared, params, run_id, {}, {})
    assert not decision.promote and "knows classes ['x', 'y']" in decision.reason

    # The same pair through `graft promote`, in a project whose test data is this one's.
    project = model_dir.parent / "project"
    (project / "data").mkdir(parents=True)
    shutil.copytree(raw, project / "data" / "raw")
    shutil.copytree(prepared, project / "data" / "prepared")
    committed = yaml.safe_load(subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, check=True,
                                              capture_output=True, text=True).stdout)  # fmt: skip
    committed["register"].update(model_name=NAME, min_accuracy=0.0, min_improvement=0.0)
    (project / "params.yaml").write_text(yaml.safe_dump(committed))
    result = CliRunner().invoke(app, ["promote", version, "--project", str(project)])
    assert result.exit_code != 0, result.output
    assert "knows classes ['x', 'y']" in result.output and "not promoted" in result.output
    assert str(registry.alias_version(__import__("mlflow").MlflowClient(), NAME, "champion").version) == "1"
