"""The data gate passes a good fixture and fails each kind of broken one, naming the
check and the offending file."""

import json
from pathlib import Path

import pytest

from graft.config.params import IngestParams, ValidateParams
from graft.data.snapshot import ingest
from graft.data.validation import format_summary, validate
from tests.conftest import make_image_folder

PARAMS = ValidateParams(min_per_class=3, max_imbalance=5.0, min_side=8, max_side=4096, on_class_change="fail")


def snapshot(tmp_path: Path, root: Path, **kw):
    out = tmp_path / "raw"
    out.mkdir(exist_ok=True)
    manifest, classes, _ = ingest(IngestParams(source="imagefolder", path=str(root), seed=0, **kw), out)
    return manifest, list(classes)


def failed(result) -> dict:
    return {c.name: c for c in result.checks if not c.success}


def test_good_fixture_passes(tmp_path, image_folder):
    manifest, classes = snapshot(tmp_path, image_folder)
    result = validate(manifest, classes, PARAMS)
    assert result.success, format_summary(result, Path("m"))
    assert result.class_counts == {"cat": 12, "dog": 12, "fox": 12}


def test_corrupt_png_is_named(tmp_path, image_folder):
    (image_folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    manifest, classes = snapshot(tmp_path, image_folder)
    result = validate(manifest, classes, PARAMS)
    assert not result.success
    check = failed(result)["every image decodes"]
    assert [e["path"] for e in check.examples] == ["dog/broken.png"]
    assert "dog/broken.png" in format_summary(result, Path("m"))


def test_unknown_label_is_named(tmp_path, image_folder):
    manifest, classes = snapshot(tmp_path, image_folder, classes=("cat", "dog", "fox"))
    manifest.loc[0, "class_name"] = "wolf"
    result = validate(manifest, classes, PARAMS)
    check = failed(result)["every label is a declared class"]
    assert check.unexpected_count == 1
    assert check.examples[0]["path"] == manifest.loc[0, "path"]
    assert check.examples[0]["class_name"] == "wolf"


def test_empty_class_is_a_named_failure_beside_the_other_bad_files(tmp_path, capsys):
    """An empty class folder once crashed the stage (an infinite imbalance ratio in the
    JSON report) and hid every other problem of the folder."""
    from stages.validate import main

    root = make_image_folder(tmp_path / "src", classes=("a", "b"), per_class=5)
    (root / "empty").mkdir()
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    manifest, classes = snapshot(tmp_path, root)
    result = validate(manifest, classes, PARAMS)
    names = failed(result)
    assert [e["class_name"] for e in names["every class has at least 3 samples"].examples] == ["empty"]
    assert [e["path"] for e in names["every image decodes"].examples] == ["b/broken.png"]
    # The imbalance is measured between non-empty classes (6 / 5): the empty one is named above.
    assert "largest / smallest class <= 5" not in names

    params = tmp_path / "params.yaml"
    params.write_text("validate: {min_per_class: 3, max_imbalance: 5.0, min_side: 8, max_side: 4096, on_class_change: fail}\n")
    report = tmp_path / "validation.json"
    argv = ["--raw", str(tmp_path / "raw"), "--report", str(report), "--accepted", str(tmp_path / "acc.json"), "--params", str(params)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "empty" in err and "b/broken.png" in err and "Traceback" not in err
    assert json.loads(report.read_text())["success"] is False
    assert not (tmp_path / "acc.json").exists()  # nothing accepted


def test_one_class_is_refused_naming_the_class(tmp_path):
    root = make_image_folder(tmp_path / "src", classes=("only",), per_class=8)
    manifest, classes = snapshot(tmp_path, root)
    result = validate(manifest, classes, PARAMS)
    check = failed(result)["every split has at least two classes"]
    assert check.examples == [{"split": "train", "classes": 1, "classes found": "only"}]


def test_one_class_in_the_source_test_split_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "src", classes=("a", "b"), per_class=6, splits=True)
    for f in (root / "test" / "b").iterdir():
        f.unlink()
    manifest, classes = snapshot(tmp_path, root)
    result = validate(manifest, classes, PARAMS)
    check = failed(result)["every split has at least two classes"]
    assert check.examples == [{"split": "test", "classes": 1, "classes found": "a"}]
    text = format_summary(result, Path("m"))
    assert "failed: every split has at least two classes: 1 split(s)" in text
    assert "the test split: classes=1, classes found=a" in text and "None" not in text, text


def test_class_change_failure_names_the_setting(tmp_path, image_folder):
    manifest, classes = snapshot(tmp_path, image_folder)
    result = validate(manifest, classes, PARAMS, accepted_classes=["cat", "dog", "owl"])
    text = format_summary(result, Path("m"))
    assert "validate.on_class_change" in text and "Fix or remove the files" not in text


def test_train_test_duplicate_is_leakage(tmp_path):
    root = make_image_folder(tmp_path / "src", classes=("a", "b"), per_class=6, splits=True)
    dup = root / "test" / "a" / "copy_of_train.png"
    dup.write_bytes((root / "train" / "a" / "img_001.png").read_bytes())
    manifest, classes = snapshot(tmp_path, root)
    result = validate(manifest, classes, PARAMS)
    check = failed(result)["no image in both train and test"]
    assert sorted(e["path"] for e in check.examples) == ["test/a/copy_of_train.png", "train/a/img_001.png"]


def test_size_bounds(tmp_path, image_folder):
    manifest, classes = snapshot(tmp_path, image_folder)
    strict = ValidateParams(min_per_class=3, max_imbalance=5.0, min_side=17, max_side=4096, on_class_change="fail")
    result = validate(manifest, classes, strict)
    assert "width within bounds" in failed(result) and "height within bounds" in failed(result)


def test_missing_column_fails_clearly(tmp_path, image_folder):
    manifest, classes = snapshot(tmp_path, image_folder)
    result = validate(manifest.drop(columns=["sha256"]), classes, PARAMS)
    assert "manifest has every column" in failed(result)


@pytest.mark.parametrize("policy, success", [("fail", False), ("warn", True)])
def test_class_change_against_accepted(tmp_path, image_folder, policy, success):
    manifest, classes = snapshot(tmp_path, image_folder)
    p = ValidateParams(min_per_class=3, max_imbalance=5.0, min_side=8, max_side=4096, on_class_change=policy)
    result = validate(manifest, classes, p, accepted_classes=["cat", "dog", "owl"])
    assert result.success is success
    assert result.class_change == {"added": ["fox"], "removed": ["owl"]}
    assert "same classes as the last accepted run: added fox; removed owl" in format_summary(result, Path("m"))
    same = validate(manifest, classes, p, accepted_classes=["cat", "dog", "fox"])
    assert same.success


@pytest.mark.parametrize("policy, success", [("warn", True), ("fail", False)])
def test_a_sample_under_two_labels_is_named(tmp_path, policy, success):
    root = make_image_folder(tmp_path / "src", classes=("cat", "dog"), per_class=6)
    (root / "dog" / "twin.png").write_bytes((root / "cat" / "img_001.png").read_bytes())
    manifest, classes = snapshot(tmp_path, root)
    p = ValidateParams(min_per_class=3, max_imbalance=5.0, min_side=8, max_side=4096, on_class_change="fail",
                       on_conflicting_labels=policy)  # fmt: skip
    result = validate(manifest, classes, p)
    assert result.success is success
    check = failed(result)["no sample carries two labels"]
    assert check.severity == ("warning" if policy == "warn" else "error")
    assert sorted((e["path"], e["label"]) for e in check.examples) == [("cat/img_001.png", "cat"), ("dog/twin.png", "dog")]
    assert "no sample carries two labels: 2 sample(s)" in format_summary(result, Path("m"))
