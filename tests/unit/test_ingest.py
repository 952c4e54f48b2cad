import tarfile

import numpy as np
import pytest

from graft.base.errors import GraftError
from graft.config.params import IngestParams
from graft.data.snapshot import MANIFEST_COLUMNS, ingest, read_manifest, subsample
from graft.modalities import image
from graft.modalities.image import read_fashion_mnist
from tests.conftest import FASHION_MNIST, make_image_folder, requires_fashion_mnist, write_image


def params(path, **kw) -> IngestParams:
    base = dict(source="imagefolder", path=str(path), seed=0)
    base.update(kw)
    return IngestParams(**base)


def test_imagefolder_manifest(tmp_path, image_folder):
    out = tmp_path / "raw"
    out.mkdir()
    manifest, classes, ignored = ingest(params(image_folder), out)
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, *image.MANIFEST_COLUMNS]
    assert classes == ("cat", "dog", "fox")
    assert len(manifest) == 36 and set(manifest["split"]) == {"train"}
    assert manifest["error"].isna().all()
    assert set(manifest["mode"]) == {"RGB", "L", "RGBA", "P"}
    assert (manifest["label"] == manifest["class_name"].map({"cat": 0, "dog": 1, "fox": 2})).all()
    with tarfile.open(out / "samples.tar") as tar:
        assert tar.getnames() == manifest["member"].tolist()
    again, _ = read_manifest(out)
    assert again["sha256"].tolist() == manifest["sha256"].tolist()
    some, _ = read_manifest(out, columns=["id", "class_name", "width"])  # a reader that needs a few
    assert list(some.columns) == ["id", "class_name", "width"]
    assert some["width"].dtype == "Int64" and some["id"].tolist() == manifest["id"].tolist()


def test_split_folders_and_formats(tmp_path):
    root = make_image_folder(tmp_path / "src", classes=("a", "b"), per_class=6, splits=True)
    write_image(root / "train" / "a" / "x.bmp", seed=101, fmt="BMP")
    write_image(root / "train" / "b" / "y.webp", seed=102, fmt="WEBP")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "raw"
    out.mkdir()
    manifest, classes, ignored = ingest(params(root), out)
    assert set(manifest["split"]) == {"train", "test"}
    assert ignored == ["train/a/notes.txt"]
    assert {"train/a/x.bmp", "train/b/y.webp"} <= set(manifest["path"])
    assert manifest["error"].isna().all()


def test_corrupt_file_is_recorded_not_dropped(tmp_path, image_folder):
    (image_folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    good = image_folder / "cat" / "img_001.png"
    (image_folder / "cat" / "truncated.png").write_bytes(good.read_bytes()[:60])
    out = tmp_path / "raw"
    out.mkdir()
    manifest, _, _ = ingest(params(image_folder), out)
    bad = manifest[manifest["error"].notna()]
    assert sorted(bad["path"]) == ["cat/truncated.png", "dog/broken.png"]


def test_same_input_gives_byte_identical_outputs(tmp_path, image_folder):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        ingest(params(image_folder, max_train_per_class=5), out)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1]
    assert set(outs[0]) == {"samples.tar", "manifest.csv", "classes.json", "meta.json"}


def test_subsample_is_stratified_and_seeded(image_folder):
    source = image.read_source(params(None), image_folder)
    a = subsample(source.candidates, {"train": 4}, seed=1)
    b = subsample(source.candidates, {"train": 4}, seed=1)
    c = subsample(source.candidates, {"train": 4}, seed=2)
    assert [x.path for x in a] == [x.path for x in b]
    assert [x.path for x in a] != [x.path for x in c]
    counts = {k: sum(x.class_name == k for x in a) for k in ("cat", "dog", "fox")}
    assert counts == {"cat": 4, "dog": 4, "fox": 4}


def test_declared_classes_mark_unknown_labels(tmp_path, image_folder):
    out = tmp_path / "raw"
    out.mkdir()
    manifest, classes, _ = ingest(params(image_folder, classes=("cat", "dog")), out)
    assert classes == ("cat", "dog")
    assert (manifest.loc[manifest["class_name"] == "fox", "label"] == -1).all()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such directory"),
        (lambda p: p.mkdir(), "no class folders found"),
        (lambda p: (p / "cat").mkdir(parents=True), "no images found"),
    ],
    ids=["missing", "empty", "no-images"],
)
def test_bad_sources_name_the_path(tmp_path, setup, message):
    src = tmp_path / "src"
    setup(src)
    with pytest.raises(GraftError, match=message) as e:
        image.read_source(params(None), src)
    assert str(src) in str(e.value)


def test_mixed_split_and_class_folders_rejected(tmp_path):
    write_image(tmp_path / "src" / "train" / "a" / "1.png")
    write_image(tmp_path / "src" / "b" / "1.png")
    with pytest.raises(GraftError, match="other folders"):
        image.read_source(params(None), tmp_path / "src")


def test_fashion_mnist_missing_files_says_how_to_install(tmp_path):
    with pytest.raises(GraftError, match="apt-get install dataset-fashion-mnist"):
        read_fashion_mnist(tmp_path)


@requires_fashion_mnist
def test_fashion_mnist_slice(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    manifest, classes, _ = ingest(
        IngestParams(source="fashion-mnist", path=str(FASHION_MNIST), seed=0, max_train_per_class=3, max_test_per_class=2), out
    )
    assert len(classes) == 10 and classes[9] == "Ankle boot"
    assert manifest.groupby("split").size().to_dict() == {"test": 20, "train": 30}
    assert set(manifest["width"]) == {28} and set(manifest["mode"]) == {"L"}
    assert np.all(manifest.groupby(["split", "label"]).size().to_numpy() == np.array([2] * 10 + [3] * 10))
