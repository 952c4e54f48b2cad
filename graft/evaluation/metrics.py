"""Stage ``evaluate``: the fine-tuned model on the held-out test split.

Accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix (PNG and CSV),
expected calibration error with a reliability diagram, and the most confident mistakes
as the modality presents them (images: a grid; texts: a table of snippets), in
``mistakes/``. ``metrics.json`` is a DVC metric; the plots are declared in ``dvc.yaml``; all
of it goes to the pipeline's MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from graft.base import plots
from graft.models import modeling

ECE_BINS = 15  # equal-width confidence bins, the usual choice (Guo et al., 2017)


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error: the sample-weighted mean |accuracy - confidence| over
    equal-width confidence bins; also the bins, for the reliability diagram."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = which == b
        if not mask.any():
            continue
        acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += mask.mean() * abs(acc - conf)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "accuracy": acc, "confidence": conf, "count": int(mask.sum())})
    return float(ece), bins


def compute_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, len(classes))
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    ece, bins = calibration(probs.max(1), pred == y)
    return {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1.mean()),
        "ece": ece,
        "n": int(len(y)),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(cm[i].sum())}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "calibration_bins": bins,
    }


# --- plots ---------------------------------------------------------------------------------


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    plt = plots.pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.55 * n))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    plots.save_png(fig, path)


def reliability_figure(bins: list[dict[str, float]], ece: float):
    """Bars: accuracy per confidence bin, drawn over the bin, with its sample count on
    top; dots: each bin's (mean confidence, accuracy), which lie on the diagonal when the
    model is calibrated."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
    bars = ax.bar(centers, [b["accuracy"] for b in bins], width=1 / ECE_BINS, edgecolor="black", alpha=0.7,
                  label="accuracy of the bin")  # fmt: skip
    for bar, b in zip(bars, bins, strict=True):
        ax.annotate(f"n={b['count']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)  # fmt: skip
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="red",
            label="bin: (mean confidence, accuracy)")  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1.12), xlabel="confidence (top-class probability)", ylabel="accuracy",
           title=f"reliability (ECE {ece:.3f}, {sum(b['count'] for b in bins)} test samples)")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_reliability(bins: list[dict[str, float]], ece: float, path: Path) -> None:
    plots.save_png(reliability_figure(bins, ece), path)


def measure_serving(model_dir: Path, raw_dir: Path, prepared_dir: Path) -> dict[str, float]:
    """The model's serving cost as the registered pyfunc pays it (from raw test samples),
    and its size: what register's latency limit and a teacher-student comparison read."""
    from graft.data.samples import RawSamples
    from graft.models import serving

    model = serving.load_folder(model_dir)
    samples = RawSamples(raw_dir, prepared_dir, "test").head(serving.THROUGHPUT_BATCH)
    return {**serving.serving_cost(lambda frame: model.predict(None, frame), samples),
            **serving.model_size(model_dir, model.model)}




def tta_note(cfg) -> str:
    how = modeling.tta_of(cfg)
    return "" if how == "none" else f" (test-time augmentation: {how})"
