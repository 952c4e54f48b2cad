"""The data stages through real DVC, in a temporary copy of the project."""

import json

import numpy as np
import pytest

from tests.conftest import dvc, make_image_folder, requires_fashion_mnist, set_params

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@requires_fashion_mnist
def test_fashion_mnist_slice_and_noop_rerun(project):
    set_params(project, ingest={"max_train_per_class": 12, "max_test_per_class": 4}, preprocess={"image_size": 16})
    first = dvc(project, "repro", "preprocess")
    assert ran_stages(first.stdout) == {"ingest", "validate", "preprocess"}
    x = np.load(project / "data/prepared/train_x.npy")
    assert x.shape[1:] == (16, 16, 3) and x.dtype == np.uint8
    metrics = json.loads((project / "reports/preprocess.json").read_text())
    assert metrics["samples"]["test"] == 40
    assert json.loads((project / "reports/validation.json").read_text())["success"] is True

    second = dvc(project, "repro", "preprocess")
    assert ran_stages(second.stdout) == set()
    assert second.stdout.count("didn't change, skipping") == 3

    # One stage's parameter reruns only that stage (and what follows it).
    set_params(project, preprocess={"image_size": 20})
    third = dvc(project, "repro", "preprocess")
    assert ran_stages(third.stdout) == {"preprocess"}
    assert np.load(project / "data/prepared/val_x.npy").shape[1:] == (20, 20, 3)


def test_image_folder_runs_and_broken_one_stops_at_validate(project, tmp_path):
    src = make_image_folder(tmp_path / "my_images", classes=("ant", "bee"), per_class=15)
    set_params(project, ingest={"source": "imagefolder", "path": str(src), "max_train_per_class": None},
               preprocess={"image_size": 16})
    ok = dvc(project, "repro", "preprocess")
    assert ran_stages(ok.stdout) == {"ingest", "validate", "preprocess"}
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["classes"] == ["ant", "bee"]

    (src / "bee" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "ant" / "half.jpg").write_bytes((src / "ant" / "img_000.jpg").read_bytes()[:100])
    prepared_before = (project / "data/prepared/train_x.npy").read_bytes()
    bad = dvc(project, "repro", "preprocess", check=False)
    assert bad.returncode != 0
    out = bad.stdout + bad.stderr
    assert ran_stages(out) == {"ingest", "validate"}
    assert "every image decodes" in out and "bee/corrupt.png" in out and "ant/half.jpg" in out
    report = json.loads((project / "reports/validation.json").read_text())
    assert report["success"] is False
    # The failed run left the previous prepared data untouched.
    assert (project / "data/prepared/train_x.npy").read_bytes() == prepared_before


def test_a_new_class_between_two_real_runs_is_caught_until_allowed(project, tmp_path):
    """The accepted snapshot (data/accepted.json, a persistent DVC output) carries over:
    a class that appears after an accepted run fails validate, naming the class and the
    setting, until validate.on_class_change says warn."""
    src = make_image_folder(tmp_path / "imgs", classes=("ant", "bee"), per_class=12)
    set_params(project, ingest={"source": "imagefolder", "path": str(src), "max_train_per_class": None},
               preprocess={"image_size": 16})
    assert dvc(project, "repro", "validate").returncode == 0
    assert json.loads((project / "data/accepted.json").read_text())["classes"] == ["ant", "bee"]

    make_image_folder(src, classes=("wasp",), per_class=12, seed0=500)
    changed = dvc(project, "repro", "validate", check=False)
    out = changed.stdout + changed.stderr
    assert changed.returncode != 0
    assert "same classes as the last accepted run: added wasp\n" in out  # nothing removed
    assert "validate.on_class_change" in out
    assert json.loads((project / "data/accepted.json").read_text())["classes"] == ["ant", "bee"]  # not accepted

    set_params(project, validate={"on_class_change": "warn"})
    allowed = dvc(project, "repro", "validate", check=False)
    assert allowed.returncode == 0, allowed.stdout[-2000:]
    assert "warning: same classes as the last accepted run" in allowed.stdout
    assert json.loads((project / "data/accepted.json").read_text())["classes"] == ["ant", "bee", "wasp"]
