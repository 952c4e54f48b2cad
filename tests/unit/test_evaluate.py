"""Metrics on a tiny example computed by hand."""

import numpy as np
import pytest

from graft.evaluation.metrics import calibration, compute_metrics, plot_confusion, plot_reliability
from graft.modalities import image

# 5 samples, 2 classes. Predictions: 0, 0, 1, 1, 1 (argmax); truth: 0, 1, 1, 1, 0.
Y = np.array([0, 1, 1, 1, 0])
P = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55]])


def test_confusion_matrix():
    assert compute_metrics(Y, P, ["a", "b"])["confusion_matrix"] == [[1, 1], [1, 2]]  # rows: truth


def test_a_class_never_predicted_scores_zero_not_nan():
    m = compute_metrics(np.array([0, 1, 2]), np.eye(3)[[0, 1, 1]], ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["confusion_matrix"][2] == [0, 1, 0]


def test_metrics_by_hand():
    m = compute_metrics(Y, P, ["a", "b"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    # class a: precision 1/2, recall 1/2, F1 1/2; class b: precision 2/3, recall 2/3, F1 2/3
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_ece_by_hand():
    conf = np.array([0.9, 0.6, 0.7, 0.8, 0.55])
    correct = np.array([True, False, True, True, False])
    # 5 bins of width 0.2: (0.4,0.6] holds 0.6 and 0.55 (acc 0, conf 0.575);
    # (0.6,0.8] holds 0.7 and 0.8 (acc 1, conf 0.75); (0.8,1] holds 0.9 (acc 1, conf 0.9).
    ece, bins = calibration(conf, correct, n_bins=5)
    expected = 2 / 5 * 0.575 + 2 / 5 * 0.25 + 1 / 5 * 0.1
    assert ece == pytest.approx(expected)
    assert [b["count"] for b in bins] == [2, 2, 1]


def test_perfect_predictions():
    y = np.array([0, 1, 2])
    m = compute_metrics(y, np.eye(3), ["a", "b", "c"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["ece"] == 0.0


def test_plots_are_written(tmp_path):
    m = compute_metrics(Y, P, ["a", "b"])
    x = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    plot_confusion(np.array(m["confusion_matrix"]), ["a", "b"], tmp_path / "cm.png")
    plot_reliability(m["calibration_bins"], m["ece"], tmp_path / "rel.png")
    np.save(tmp_path / "test_ids.npy", np.array(["000001", "000002", "000003", "000004", "000005"]))
    (worst,) = image.present_mistakes(x, Y, P, ["a", "b"], tmp_path, tmp_path, names={"000002": "test/b/two.png"})
    from PIL import Image

    for name in ("cm.png", "rel.png", "worst_mistakes.png"):
        with Image.open(tmp_path / name) as im:  # a real, drawn image: decodes, has a size, is not blank
            pixels = np.asarray(im.convert("L"), dtype=float)
        assert min(pixels.shape) > 100 and pixels.std() > 10, name


def test_reliability_diagram_says_what_it_draws():
    from graft.evaluation.metrics import calibration, reliability_figure

    conf = np.array([0.15, 0.55, 0.6, 0.95, 0.97])
    ece, bins = calibration(conf, np.array([0, 1, 0, 1, 1], dtype=bool))
    fig = reliability_figure(bins, ece)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "bin: (mean confidence, accuracy)" in labels and "mean confidence" not in labels
    counts = sorted(t.get_text() for t in ax.texts)
    assert counts == sorted(f"n={b['count']}" for b in bins) and sum(b["count"] for b in bins) == 5


def test_evaluate_refuses_a_model_with_non_finite_outputs(tmp_path, capsys):
    """A diverged model once reached evaluate, which crashed writing NaN into JSON (and
    was retried for nothing): now it is bad input, exit 2, with the likely cause."""
    import torch

    from graft.config.params import IngestParams, LoadPretrainedParams, PreprocessParams
    from graft.data.snapshot import ingest
    from graft.data.splits import preprocess
    from graft.models import modeling
    from graft.models.pretrained import load_pretrained
    from stages.evaluate import main
    from tests.conftest import make_image_folder

    src = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=6)
    raw, prepared, model_dir = tmp_path / "raw", tmp_path / "prepared", tmp_path / "model"
    raw.mkdir(), prepared.mkdir()
    manifest, classes, _ = ingest(IngestParams(source="imagefolder", path=str(src), seed=0), raw)
    preprocess(manifest, list(classes), raw / "samples.tar",
               PreprocessParams(image_size=16, val_fraction=0.2, test_fraction=0.3, resize="squash", seed=0),
               LoadPretrainedParams("tf_efficientnet_lite0", "scratch:tf_efficientnet_lite0"), prepared)  # fmt: skip
    model, cfg = load_pretrained(LoadPretrainedParams("tf_efficientnet_lite0", "scratch:tf_efficientnet_lite0"),
                                 prepared, model_dir / "assets")  # fmt: skip
    with torch.no_grad():
        model.get_classifier().weight.fill_(float("nan"))
    modeling.save(model_dir, model, cfg)
    with pytest.raises(SystemExit) as e:
        main(["--raw", str(raw), "--prepared", str(prepared), "--model", str(model_dir), "--reports", str(tmp_path / "reports")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite outputs (NaN or inf)" in err and "fine_tune.lr" in err
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_saved_weights_are_byte_identical_for_equal_models(tmp_path):
    """Equal weights, equal files: the DVC hash of a model directory depends on its content
    only (not on the temporary file name it was written through)."""
    import timm

    from graft.models import modeling

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    cfg = modeling.ModelConfig(architecture="tf_efficientnet_lite0", classes=["a", "b", "c"], drop_rate=0.0,
                               source="scratch", weights_sha256=None,
                               input={"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                      "resize": "squash"})  # fmt: skip
    for out in ("a", "b"):
        modeling.save(tmp_path / out, model, cfg)
    assert (tmp_path / "a" / modeling.WEIGHTS).read_bytes() == (tmp_path / "b" / modeling.WEIGHTS).read_bytes()


def test_predictions_of_a_model_left_in_training_mode_are_eval_mode_ones():
    """predict_proba switches a model that is training (dropout on, BatchNorm on the batch's
    statistics) to eval mode, and does not walk the model again once it is there."""
    import torch

    from graft.models import modeling

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Dropout(0.5), torch.nn.Linear(4 * 6 * 6, 3))  # fmt: skip
    cfg = modeling.ModelConfig("tiny", ["a", "b", "c"], 0.5, "test", None, {"mean": [0.5] * 3, "std": [0.25] * 3})
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    net.train()
    first = modeling.predict_proba(net, x, cfg, batch_size=2)
    assert not net.training and not any(m.training for m in net.modules())
    assert np.allclose(first, modeling.predict_proba(net, x, cfg, batch_size=5), atol=1e-6)
    with torch.inference_mode():
        expected = net(modeling.to_input(x, cfg, torch.device("cpu"))).softmax(1).numpy()
    assert np.allclose(first, expected, atol=1e-6)
