import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from graft.base import images
from graft.base.errors import GraftError
from graft.config import params
from graft.config.params import IngestParams, LoadPretrainedParams, PreprocessParams
from graft.data.snapshot import ingest
from graft.data.splits import assign_splits, load_split, preprocess
from tests.conftest import make_image_folder

BACKBONE = LoadPretrainedParams("tf_efficientnet_lite0", "packaged:efficientnet_lite0")

PARAMS = PreprocessParams(image_size=12, val_fraction=0.25, test_fraction=0.25, resize="center_crop", seed=3)


def toy_manifest(n_per_class=8, classes=2, test=False):
    rows = []
    for c in range(classes):
        for i in range(n_per_class):
            rows.append({"label": c, "split": "train", "sha256": f"{c}-{i}"})
        if test:
            rows.append({"label": c, "split": "test", "sha256": f"{c}-t"})
    return pd.DataFrame(rows)


def test_split_is_stratified_and_seeded():
    m = toy_manifest()
    a = assign_splits(m, 0.25, 0.25, seed=1)
    assert a.tolist() == assign_splits(m, 0.25, 0.25, seed=1).tolist()
    assert a.tolist() != assign_splits(m, 0.25, 0.25, seed=2).tolist()
    counts = pd.crosstab(m["label"], a)
    assert (counts["test"] == 2).all() and (counts["val"] == 2).all() and (counts["train"] == 4).all()


def test_source_test_split_is_kept():
    m = toy_manifest(test=True)
    a = assign_splits(m, 0.25, 0.25, seed=0)
    assert (a[m["split"] == "test"] == "test").all()
    assert (a[m["split"] == "train"] != "test").all()


def test_identical_content_stays_in_one_split():
    m = toy_manifest(n_per_class=20, classes=1)
    m.loc[5:9, "sha256"] = "dup"
    a = assign_splits(m, 0.3, 0.3, seed=0)
    assert a[m["sha256"] == "dup"].nunique() == 1


def test_arrays_written(tmp_path):
    root = make_image_folder(tmp_path / "src", classes=("a", "b"), per_class=8)
    raw, out = tmp_path / "raw", tmp_path / "prep"
    raw.mkdir(), out.mkdir()
    manifest, classes, _ = ingest(IngestParams(source="imagefolder", path=str(root), seed=0), raw)
    metrics = preprocess(manifest, list(classes), raw / "samples.tar", PARAMS, BACKBONE, out)
    assert sum(metrics["samples"].values()) == 16
    x, y = load_split(out, "train")
    assert x.dtype == np.uint8 and x.shape[1:] == (12, 12, 3) and len(x) == len(y)
    assert x[:].std() > 0  # real pixels, not zeros
    assert np.array_equal(x[:], np.load(out / "train_x.npy"))  # a plain .npy: numpy reads it too
    assert metrics["per_class"]["test"] == {"a": 2, "b": 2}


def test_refuses_unvalidated_manifest(tmp_path):
    root = make_image_folder(tmp_path / "src", classes=("a", "b"), per_class=4)
    (root / "a" / "bad.png").write_bytes(b"junk")
    raw = tmp_path / "raw"
    raw.mkdir()
    manifest, classes, _ = ingest(IngestParams(source="imagefolder", path=str(root), seed=0), raw)
    with pytest.raises(GraftError, match="run validate first"):
        preprocess(manifest, list(classes), raw / "samples.tar", PARAMS, BACKBONE, tmp_path)


def test_bad_fraction_is_an_error():
    with pytest.raises(GraftError, match="preprocess.val_fraction"):
        params.parse(PreprocessParams, dict(image_size=12, val_fraction=1.5, test_fraction=0.2, resize="squash", seed=0), "preprocess")


def _encode(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_modes_convert_to_rgb():
    transparent = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert images.load_rgb_array(_encode(transparent), 4, "bicubic", "squash").min() == 255  # white, not black
    gray = Image.new("L", (10, 10), 77)
    arr = images.load_rgb_array(_encode(gray), 4, "bilinear", "squash")
    assert arr.shape == (4, 4, 3) and (arr == 77).all()
    wide = Image.new("RGB", (40, 10), (0, 0, 0))
    wide.paste((0, 255, 0), (15, 0, 25, 10))  # a green band in the middle
    crop = images.load_rgb_array(_encode(wide), 10, "nearest", "center_crop")
    assert crop.shape == (10, 10, 3) and (crop[:, :, 1] == 255).mean() == 1.0


def test_a_split_with_one_class_is_refused_naming_it(tmp_path):
    """Class b has one image: it lands in train, so val holds class a alone. A model
    scored on one class is always right; preprocess stops and names the split."""
    from graft.base.errors import GraftError
    from graft.config.params import IngestParams, PreprocessParams
    from graft.data.snapshot import ingest
    from graft.data.splits import preprocess
    from tests.conftest import make_image_folder

    src = make_image_folder(tmp_path / "src", classes=("a", "b"), per_class=10)
    for f in sorted((src / "b").iterdir())[1:]:
        f.unlink()
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir(), out.mkdir()
    manifest, classes, _ = ingest(IngestParams(source="imagefolder", path=str(src), seed=0), raw)
    params = PreprocessParams(image_size=16, val_fraction=0.2, test_fraction=0.2, resize="squash", seed=0)
    with pytest.raises(GraftError, match=r"the (val|test) split has 1 class \(a\)"):
        preprocess(manifest, list(classes), raw / "samples.tar", params, BACKBONE, out)


def test_exif_rotation_and_16_bit_images_decode_as_seen():
    """A phone photo stored sideways with an EXIF orientation, and a 16-bit grayscale
    PNG using only part of its range, become the pixels a person sees."""
    # 20 x 10 stored, red on the left half; orientation 6 means "rotate 90 degrees
    # clockwise to view": viewed it is 10 wide and 20 tall, red on the top half.
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    arr = images.load_rgb_array(buf.getvalue(), 20, "nearest", "squash")
    top, bottom = arr[:8].reshape(-1, 3).mean(0), arr[12:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60

    # 16-bit values 1000..3000 (of 65535): rescaled to the full 0..255, not clipped to black.
    ramp = np.tile(np.linspace(1000, 3000, 16).astype(np.uint16), (16, 1))
    sixteen = Image.fromarray(ramp)  # uint16: mode I;16
    arr = images.load_rgb_array(_encode(sixteen), 16, "nearest", "squash")
    assert arr[:, 0].max() == 0 and arr[:, -1].min() == 255
    assert np.all(np.diff(arr[0, :, 0].astype(int)) >= 0)  # order kept


def test_a_sample_under_two_labels_stays_in_one_split():
    """Reuters R8 holds a text labelled both interest and money-fx: grouped within a label
    only, its two rows landed in val and test."""
    import pandas as pd

    rows = [("a", f"k{i}", 0) for i in range(10)] + [("b", f"m{i}", 1) for i in range(10)] + [("b", "k3", 1)]
    manifest = pd.DataFrame({"class_name": [c for c, _, _ in rows], "sha256": [k for _, k, _ in rows],
                             "label": [lbl for _, _, lbl in rows], "split": "train"})  # fmt: skip
    for seed in range(20):
        split = assign_splits(manifest, 0.2, 0.2, seed)
        twins = split[manifest["sha256"] == "k3"]
        assert twins.nunique() == 1, (seed, twins.tolist())
