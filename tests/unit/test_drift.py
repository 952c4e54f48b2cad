"""The drift gate's statistics and its parts, on synthetic embeddings whose truth is known
(same distribution, shifted, one class replaced), and the backbone identity it records."""

import dataclasses
import json

import numpy as np
import pytest

from graft.base.errors import GraftError
from graft.config import params
from graft.config.params import DriftParams
from graft.drift.gate import (
    backbone_sha256,
    choose,
    compare,
    domain_auc,
    folder_items,
    holm,
    mmd_test,
    read_reference,
    summary,
    write_report,
)

P = DriftParams(permutations=200)
DIM = 32


def clouds(seed: int, n: int = 200, shift: float = 0.0, classes: int = 4):
    """Labelled embeddings: one Gaussian cluster per class, all moved by ``shift``."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(scale=3.0, size=(classes, DIM))
    labels = rng.integers(0, classes, n)
    return (centres[labels] + rng.normal(size=(n, DIM)) + shift).astype(np.float32), labels


def test_same_distribution_rarely_alarms_at_the_nominal_rate():
    """20 pairs of independent samples of one distribution: a valid level-0.05 test fires
    on about 1 of them; more than 2 would mean the test is liberal."""
    alarms = [mmd_test(clouds(2 * s)[0], clouds(2 * s + 1)[0], 200, s)["p_value"] < 0.05 for s in range(20)]
    assert sum(alarms) <= 2


def test_a_shift_is_found_and_the_domain_classifier_sees_it():
    x, _ = clouds(0)
    y, _ = clouds(1, shift=1.0)
    r = mmd_test(x, y, 200, 0)
    assert r["p_value"] < 0.01 and r["mmd2"] > 0
    assert domain_auc(x, y, 0) > 0.8
    z, _ = clouds(2)
    assert 0.3 < domain_auc(x, z, 0) < 0.7  # same distribution: a coin toss


def test_identical_samples_have_no_discrepancy():
    x, _ = clouds(0)
    r = mmd_test(x, x.copy(), 100, 0)
    assert r["mmd2"] == pytest.approx(0.0, abs=1e-6) and r["p_value"] == 1.0


def test_the_smallest_p_value_is_one_over_permutations_plus_one():
    x, _ = clouds(0)
    y, _ = clouds(1, shift=5.0)
    assert mmd_test(x, y, 99, 0)["p_value"] == pytest.approx(1 / 100)


def test_holm_matches_its_definition():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert adj == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})


def test_a_replaced_class_is_named_and_the_others_are_not():
    names = ["shirt", "bag", "sneaker", "coat"]
    ref, ref_y = clouds(0, n=400)
    new, new_y = clouds(1, n=400)
    rng = np.random.default_rng(3)
    centres = np.random.default_rng(1234).normal(scale=3.0, size=(4, DIM))
    bags = (centres[1] + rng.normal(size=((new_y == 2).sum(), DIM))).astype(np.float32)
    new[new_y == 2] = bags  # "sneaker" now holds bags
    report = compare(ref, ref_y, new, new_y, names, P)
    assert report["verdict"] == "drift"
    assert report["moved"] == ["sneaker"]
    assert all(not report["classes"][c]["moved"] for c in ("shirt", "bag", "coat"))
    assert "sneaker" in summary({**report, "reference": {"origin": "graft-classifier v1"}})


def test_no_drift_when_nothing_moved_and_the_family_is_corrected():
    ref, ref_y = clouds(0, n=400)
    new, new_y = clouds(1, n=400)
    report = compare(ref, ref_y, new, new_y, ["a", "b", "c", "d"], P)
    assert report["verdict"] == "no_drift" and report["moved"] == []
    raw = [report["overall"]["p_value"], *(e["p_value"] for e in report["classes"].values())]
    assert report["p_adjusted_min"] >= min(raw)  # adjusted p-values are never smaller


def test_too_few_samples_skip_with_a_warning_never_a_pass():
    ref, ref_y = clouds(0, n=400)
    new, new_y = clouds(1, n=12)
    report = compare(ref, ref_y, new, new_y, ["a", "b", "c", "d"], P)
    assert report["verdict"] == "skipped" and report["overall"] is None
    assert "too few samples" in report["warnings"][0] and "12 new" in report["warnings"][0]
    assert "not tested" in summary(report)


def test_a_small_class_is_skipped_alone():
    ref, ref_y = clouds(0, n=400)
    new, new_y = clouds(1, n=400)
    keep = (new_y != 3) | (np.arange(len(new_y)) % 20 == 0)  # class d: a handful left
    report = compare(ref, ref_y, new[keep], new_y[keep], ["a", "b", "c", "d"], P)
    assert "skipped" in report["classes"]["d"] and "p_value" in report["classes"]["a"]
    assert any("per-class test skipped" in w and "d" in w for w in report["warnings"])


def test_unlabelled_new_data_gets_the_overall_test_only():
    ref, ref_y = clouds(0, n=300)
    new, _ = clouds(1, n=300, shift=1.0)
    report = compare(ref, ref_y, new, None, ["a", "b", "c", "d"], P)
    assert report["verdict"] == "drift" and report["classes"] == {}


@pytest.mark.parametrize("bad, key", [(dict(on_drift="stop"), "on_drift"), (dict(alpha=0.0), "alpha"),
                                      (dict(permutations=10), "permutations"), (dict(min_samples=2), "min_samples"),
                                      (dict(max_samples=10), "max_samples"), (dict(reference=" "), "reference")])  # fmt: skip
def test_bad_params_name_the_key(bad, key):
    with pytest.raises(GraftError, match=f"drift.{key}"):
        params.replace(DriftParams(), "drift", **bad)


def test_the_sample_is_seeded_and_bounded():
    a, b = choose(5000, 2000, 7), choose(5000, 2000, 7)
    assert len(a) == 2000 and (a == b).all() and (np.diff(a) > 0).all()
    assert not (choose(5000, 2000, 8) == a).all()
    assert (choose(30, 2000, 7) == np.arange(30)).all()


def test_backbone_identity_ignores_the_head_not_the_weights():
    import timm
    import torch

    torch.manual_seed(0)
    a = timm.create_model("mobilenetv3_small_050", num_classes=3)
    b = timm.create_model("mobilenetv3_small_050", num_classes=3)
    b.load_state_dict(a.state_dict())
    torch.nn.init.normal_(b.get_classifier().weight)  # another random head
    assert backbone_sha256(a) == backbone_sha256(b)
    with torch.no_grad():
        next(b.conv_stem.parameters())[0, 0, 0, 0] += 1e-3
    assert backbone_sha256(a) != backbone_sha256(b)


def test_report_and_plot_are_written(tmp_path):
    ref, ref_y = clouds(0, n=300)
    new, new_y = clouds(1, n=300, shift=0.5)
    report = compare(ref, ref_y, new, new_y, ["a", "b", "c", "d"], P)
    write_report(tmp_path / "drift", {**report, "reference": {"origin": "v1"}}, ref, new)
    assert json.loads((tmp_path / "drift" / "drift.json").read_text())["verdict"] == "drift"
    assert (tmp_path / "drift" / "drift.png").read_bytes()[:4] == b"\x89PNG"


def test_a_folder_that_is_no_reference_is_refused(tmp_path):
    with pytest.raises(GraftError, match="not a drift reference"):
        read_reference(tmp_path, str(tmp_path))


def test_class_folders_label_the_samples(tmp_path):
    from graft.modalities import image
    from tests.conftest import write_image

    for cls in ("cat", "dog"):
        for i in range(3):
            write_image(tmp_path / "incoming" / cls / f"{i}.png", seed=i)
    items = folder_items(image, tmp_path / "incoming", ["cat", "dog", "fox"])
    assert sorted({c for c, _ in items}) == ["cat", "dog"] and len(items) == 6
    value, error = items[0][1]()
    assert error == "" and value[:4] == b"\x89PNG"
    write_image(tmp_path / "flat" / "a.png")
    assert [c for c, _ in folder_items(image, tmp_path / "flat", ["cat"])] == [None]  # no class folders: unlabelled


@pytest.fixture(scope="module")
def lite0_identity(tmp_path_factory):
    """The identity the drift stage records for the packaged backbone at 32 px."""
    from graft.config.params import LoadPretrainedParams
    from graft.drift.gate import identity_of
    from graft.modalities import image
    from graft.models import modeling

    lp = LoadPretrainedParams("tf_efficientnet_lite0", "packaged:efficientnet_lite0", 0.2, 42)
    spec = {"image_size": 32, "interpolation": "bicubic", "resize": "center_crop"}
    built = image.build(lp, 10, spec, tmp_path_factory.mktemp("assets"))
    cfg = modeling.ModelConfig(architecture=built.architecture, classes=list("abcdefghij"), drop_rate=0.2,
                               source=built.source, weights_sha256=built.weights_sha256, input=built.input)  # fmt: skip
    return identity_of(built.model, cfg, 42)


def test_the_references_backbone_is_rebuilt_from_its_source_and_checked(lite0_identity):
    """Another run's backbone or input: the new data is embedded with the reference's own
    backbone, rebuilt (any head) and checked against the recorded hash."""
    from graft.drift.gate import rebuild

    e = rebuild(lite0_identity, None, "this run embeds with another backbone")
    assert e.identity["backbone_sha256"] == lite0_identity["backbone_sha256"] and e.cfg.input["image_size"] == 32
    tampered = {**lite0_identity, "backbone_sha256": "0" * 64}
    with pytest.raises(GraftError, match="rebuilt from its source it is another network.*drift.reference"):
        rebuild(tampered, None, "this run embeds with another backbone")
    gone = {**lite0_identity, "source": "file:/nonexistent/weights.pth"}
    with pytest.raises(GraftError, match="cannot be rebuilt here"):
        rebuild(gone, None, "this run embeds with another backbone")


def test_many_classes_get_enough_permutations_to_pass_holm():
    """With 30 classes Holm multiplies the smallest p by 31: 100 permutations could never
    go under alpha, so the test takes as many as the family needs."""
    p = dataclasses.replace(DriftParams(), permutations=100, min_samples=10)
    ref, ref_y = clouds(0, n=900, classes=30)
    new, new_y = clouds(1, n=900, shift=1.0, classes=30)
    report = compare(ref, ref_y, new, new_y, [f"c{i}" for i in range(30)], p)
    assert report["permutations"] == 1240  # ceil(2 * 31 / 0.05)
    assert report["verdict"] == "drift" and report["p_adjusted_min"] < 0.05


def test_skipped_classes_are_named_in_one_warning():
    ref, ref_y = clouds(0, n=400)
    new, new_y = clouds(1, n=400)
    keep = (new_y >= 2) | (np.arange(len(new_y)) % 20 == 0)  # classes a and b: a handful left each
    report = compare(ref, ref_y, new[keep], new_y[keep], ["a", "b", "c", "d"], P)
    skipped = [w for w in report["warnings"] if "per-class test skipped" in w]
    assert skipped == [f"per-class test skipped for 2 class(es) (a, b): fewer than {P.min_samples} samples on a side"]

    # A class the new data lacks is skipped for that reason, in a warning of its own.
    gone = new_y != 3
    report = compare(ref, ref_y, new[gone & keep], new_y[gone & keep], ["a", "b", "c", "d"], P)
    skipped = [w for w in report["warnings"] if "per-class test skipped" in w]
    assert skipped == [f"per-class test skipped for 2 class(es) (a, b): fewer than {P.min_samples} samples on a side",
                       "per-class test skipped for 1 class(es) (d): not in the new data"]


def test_a_class_whose_name_no_folder_can_hold_is_matched_and_said(tmp_path):
    from graft.drift.gate import class_of_folder, folder_classes
    from graft.modalities import image
    from tests.conftest import write_image

    classes = ["T-shirt/top", "Trouser"]
    assert class_of_folder("T-shirt_top", classes) == "T-shirt/top" and class_of_folder("Trouser", classes) == "Trouser"
    assert class_of_folder("Hat", classes) is None
    for cls in ("T-shirt_top", "Trouser", "Hat"):
        write_image(tmp_path / "in" / "test" / cls / "0.png")
    items = folder_items(image, tmp_path / "in", classes)
    assert sorted(c for c, _ in items) == ["Hat", "T-shirt/top", "Trouser"]
    assert folder_classes(items, tmp_path / "in", classes) == {"Hat": None, "T-shirt_top": "T-shirt/top", "Trouser": "Trouser"}


def test_a_first_run_without_reference_says_so_in_the_picture(tmp_path):
    from graft.drift.gate import headline

    report = {"verdict": "no_reference", "reason": "no champion yet: this run's embeddings become the reference",
              "warnings": [], "classes": {}}
    assert headline(report) == "not tested: no reference yet"
    assert "no champion yet" in headline(report, long=True)
    write_report(tmp_path / "drift", report, None, np.zeros((5, 4)))
    assert (tmp_path / "drift" / "drift.png").read_bytes()[:4] == b"\x89PNG"
