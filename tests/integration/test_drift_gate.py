"""The drift gate end to end, through plain DVC, the CLI and the data sensor, on small
folders of real Fashion-MNIST images: v1 is trained on folder A and carries its reference;
other images of the same distribution (B) do not drift; a class replaced by another (C)
drifts and is named; rotated images (D) stop the pipeline before training under
``on_drift: fail`` and train with a warning under ``warn``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import copy_project, dvc, project_env, requires_fashion_mnist, set_params

pytestmark = [pytest.mark.slow, requires_fashion_mnist]

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PER_CLASS = 40  # 80 % train, 10 % of it validation: 28 or 29 per class, over drift.min_samples
PARAMS = dict(
    ingest={"source": "imagefolder", "max_train_per_class": None, "max_test_per_class": None},
    preprocess={"image_size": 32},
    fine_tune={"epochs": 1, "batch_size": 16, "mode": "partial", "frozen_groups": 4},
    register={"min_accuracy": 0.0},
    drift={"permutations": 300},
)


def fashion_folder(root: Path, offset: int, replace: tuple[str, str] | None = None, rotate: bool = False) -> Path:
    """PER_CLASS Fashion-MNIST training images per class, from the ``offset``-th of each
    class on; ``replace=(a, b)`` fills class a's folder with images of class b;
    ``rotate`` turns every image by 90 degrees."""
    from PIL import Image

    from graft.modalities.image import FASHION_MNIST_CLASSES, _read_idx

    pixels = _read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz", 8)
    names = [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]
    for k, name in enumerate(names):
        source = names.index(replace[1]) if replace and name == replace[0] else k
        # a replacement draws from far along its class, never an image its own folder has
        start = offset + (5 * PER_CLASS if source != k else 0)
        picked = np.flatnonzero(labels == source)[start : start + PER_CLASS]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in picked:
            img = np.rot90(pixels[i]) if rotate else pixels[i]
            Image.fromarray(np.ascontiguousarray(img), mode="L").save(root / name / f"{i}.png")
    return root


def repro(project, check=True):
    res = dvc(project, "repro", check=False)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def graft(project, *args):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True)  # fmt: skip


def client_for(project):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=project_env(project)["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    return {"A": fashion_folder(root / "A", 0), "B": fashion_folder(root / "B", PER_CLASS),
            "C": fashion_folder(root / "C", PER_CLASS, replace=("Sneaker", "Bag")),
            "D": fashion_folder(root / "D", PER_CLASS, rotate=True)}  # fmt: skip


@pytest.fixture(scope="module")
def v1(tmp_path_factory, folders):
    """A project trained and registered (v1, champion) on folder A."""
    project = copy_project(tmp_path_factory.mktemp("drift") / "project")
    set_params(project, **PARAMS)
    set_params(project, ingest={"path": str(folders["A"])})
    repro(project)
    return project


def test_the_first_run_keeps_its_reference_and_has_nothing_to_compare(v1):
    report = json.loads((v1 / "reports/drift/drift.json").read_text())
    assert report["verdict"] == "no_reference" and "no champion" in report["reason"]
    info = json.loads((v1 / "data/reference/reference.json").read_text())
    emb = np.load(v1 / "data/reference/embeddings.npy")
    train_y = np.load(v1 / "data/prepared/train_y.npy")
    # every training image (fewer than drift.max_samples), embedded by the pretrained backbone
    assert emb.shape == (len(train_y), 1280) and info["samples"] == len(train_y) and np.isfinite(emb).all()
    assert np.bincount(np.load(v1 / "data/reference/labels.npy")).tolist() == np.bincount(train_y).tolist()
    pretrained = json.loads((v1 / "models/pretrained/model.json").read_text())
    assert info["backbone"]["source"] == "packaged:efficientnet_lite0"
    assert info["backbone"]["weights_sha256"] == pretrained["weights_sha256"]
    assert info["backbone"]["input"]["image_size"] == 32
    # The registered version carries it: what later data is tested against.
    client = client_for(v1)
    mv = client.get_model_version("graft-classifier", "1")
    files = {f.path for f in client.list_artifacts(mv.run_id, "drift_reference")}
    assert {"drift_reference/embeddings.npy", "drift_reference/reference.json"} <= files
    assert mv.tags["graft.drift"] == "no_reference"


def test_graft_drift_is_quiet_on_the_same_distribution_and_names_a_replaced_class(v1, folders, tmp_path):
    same = graft(v1, "drift", str(folders["B"]), "--exit-code")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no drift against graft-classifier v1" in same.stdout

    moved = graft(v1, "drift", str(folders["C"]), "--exit-code", "--out", str(tmp_path / "report"))
    assert moved.returncode == 1, moved.stdout + moved.stderr
    assert "DRIFT against graft-classifier v1" in moved.stdout and "Sneaker" in moved.stdout
    report = json.loads((tmp_path / "report/drift.json").read_text())
    assert report["moved"] == ["Sneaker"]  # the bags in the Bag folder are still bags
    assert report["classes"]["Bag"]["moved"] is False and report["labelled"] is True
    assert (tmp_path / "report/drift.png").stat().st_size > 0

    # Unlabelled input (one flat folder): the overall test alone still sees it.
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((folders["D"]).rglob("*.png"))[::2]:
        (flat / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    rotated = graft(v1, "drift", str(flat))
    assert rotated.returncode == 0 and "DRIFT" in rotated.stdout and "overall test only" in rotated.stdout

    missing = graft(v1, "drift", str(folders["B"]), "--reference", "graft-classifier/9")
    assert missing.returncode == 2 and "no version 9" in missing.stderr


def test_the_gate_stops_before_training_on_fail_and_trains_with_a_warning(v1, folders):
    from graft.base import fsio

    weights = fsio.sha256_file(v1 / "models/fine_tuned/weights.pt")
    set_params(v1, ingest={"path": str(folders["D"])}, drift={"on_drift": "fail"})
    res = repro(v1, check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "Training stopped (drift.on_drift: fail)" in out and "graft-classifier v1" in out
    assert fsio.sha256_file(v1 / "models/fine_tuned/weights.pt") == weights  # nothing trained
    report = json.loads((v1 / "reports/drift/drift.json").read_text())
    assert report["verdict"] == "drift" and report["overall"]["domain_auc"] > 0.75
    assert report["p_adjusted_min"] < 0.05 and report["reference"]["origin"] == "graft-classifier v1"

    set_params(v1, drift={"on_drift": "warn"})
    res = repro(v1)
    assert "DRIFT against graft-classifier v1" in res.stdout
    client = client_for(v1)
    mv = client.get_model_version("graft-classifier", "2")
    assert mv.tags["graft.drift"].startswith("drift against graft-classifier v1")
    assert "drift gate: drift against graft-classifier v1" in mv.description
    run = client.get_run(mv.run_id)
    assert run.data.metrics["drift_p_adjusted"] < 0.05 and run.data.metrics["drift_domain_auc"] > 0.75
    assert {f.path for f in client.list_artifacts(mv.run_id, "drift")} == {"drift/drift.json", "drift/drift.png"}


def test_the_sensor_retrains_on_drift_only(v1, folders, prefect_harness, monkeypatch):
    """trigger=drift: a changed source that did not drift starts no training (and is not
    embedded again on the next check); one that drifted does."""
    from flows.fingerprint import fingerprint, record_accepted
    from flows.sensor import data_sensor, source_drift

    for key, value in project_env(v1).items():
        if key in ("MLFLOW_TRACKING_URI", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS"):
            monkeypatch.setenv(key, value)
    set_params(v1, ingest={"path": str(folders["A"])}, drift={"reference": "graft-classifier/1"})
    record_accepted(v1, fingerprint(v1))  # v1 was trained on A
    set_params(v1, ingest={"path": str(folders["B"])})
    quiet = data_sensor(project_dir=str(v1), trigger="drift")
    assert quiet["triggered"] is False and quiet["drift"] == "no_drift"
    assert (v1 / ".graft/drift_checked_source.json").is_file()
    set_params(v1, ingest={"path": str(folders["D"])})
    assert source_drift(v1)["verdict"] == "drift"  # what would start the training flow


def test_another_input_size_is_embedded_with_the_references_own_backbone(v1, folders):
    """This run at 24 px, the reference at 32: the new data is embedded again the
    reference's way (its backbone rebuilt and checked), so the same images do not drift."""
    set_params(v1, ingest={"path": str(folders["A"])}, preprocess={"image_size": 24},
               drift={"reference": "graft-classifier/1", "on_drift": "fail"})  # fmt: skip
    res = dvc(v1, "repro", "drift", check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((v1 / "reports/drift/drift.json").read_text())
    assert report["re_embedded"] is True and report["verdict"] == "no_drift"
    assert report["overall"]["mmd2"] == pytest.approx(0.0, abs=1e-6)  # the very images v1 was trained on
    assert report["reference"]["backbone"]["input"]["image_size"] == 32
    mine = json.loads((v1 / "data/reference/reference.json").read_text())
    assert mine["backbone"]["input"]["image_size"] == 24  # this run's reference is its own
