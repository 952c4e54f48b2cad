"""Evaluation of the fine-tuned model on the held-out test split.

Accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix (PNG and CSV),
expected calibration error with a reliability diagram, and the most confident mistakes
as the modality presents them (images: a grid; texts: a table of snippets), in
``mistakes/``. ``metrics.json`` is a DVC metric; the plots are declared in ``dvc.yaml``; all
of it goes to the pipeline's MLflow run.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from graft.base import fsio, plots
from graft.base.errors import GraftError
from graft.config import paths
from graft.data.samples import RawSamples
from graft.data.snapshot import read_manifest
from graft.data.splits import load_split
from graft.models import modeling
from graft.tracking import runs as tracking

ECE_BINS = 15  # equal-width confidence bins, the usual choice (Guo et al., 2017)


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
    from sklearn import metrics  # scikit-learn: 1.7 s of import, paid where the scores are computed

    pred = probs.argmax(1)
    labels = list(range(len(classes)))
    cm = metrics.confusion_matrix(y, pred, labels=labels)  # rows: true classes, columns: predicted
    # A class never predicted (or absent) scores 0 there, not a warning and NaN.
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
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
    from graft.models import serving  # the library module: imported where used

    model = serving.load_folder(model_dir)
    samples = RawSamples(raw_dir, prepared_dir, "test").head(serving.THROUGHPUT_BATCH)
    return {**serving.serving_cost(lambda frame: model.predict(None, frame), samples),
            **serving.model_size(model_dir, model.model)}




def tta_note(cfg) -> str:
    how = modeling.tta_of(cfg)
    return "" if how == "none" else f" (test-time augmentation: {how})"


# --- the stage's outputs ---------------------------------------------------------------------

ARTIFACTS = ("metrics.json", "evaluation.json", "confusion_matrix.csv", "confusion_matrix.png", "reliability.png",
             "predictions.csv", paths.SERVING_FILE)  # fmt: skip


def score_test_split(model_dir: Path, prepared: Path, batch_size: int):
    """The model's class probabilities on the test split: (cfg, x, y, ids, probs); a model
    whose outputs are not finite is refused (its weights are broken)."""
    model, cfg = modeling.load(model_dir, modeling.resolve_device())
    x, y = load_split(prepared, "test")
    ids = np.load(prepared / "test_ids.npy")
    probs = modeling.predict_proba(model, x, cfg, batch_size=batch_size, desc="evaluate")
    broken = int((~np.isfinite(probs)).any(1).sum())
    if broken:
        raise GraftError(
            f"evaluate: the model in {model_dir} gives non-finite outputs (NaN or inf) for {broken} of {len(probs)} "
            f"test {cfg.kind.SAMPLES}: its weights are broken (training diverged). Retrain with a lower fine_tune.lr."
        )
    return cfg, x, y, ids, probs


def sample_names(raw: Path) -> dict[str, str]:
    """Each sample's manifest id -> its name in the source (a file, ``file:line``, an
    archive member), the way a person finds it again."""
    manifest, _ = read_manifest(raw, ["id", "path"])
    return dict(zip(manifest["id"], manifest["path"], strict=True))


def write_reports(out: Path, m: dict[str, Any], cfg, x, y, ids, probs, prepared: Path,
                  cost: dict[str, float], names: dict[str, str] | None = None) -> tuple[dict[str, Any], list[Path]]:  # fmt: skip
    """metrics.json (the DVC metric), evaluation.json, predictions and confusion matrix as
    CSV, the confusion and reliability plots, the modality's mistakes, serving.json; the
    headline metrics and the mistakes' files. ``names`` (:func:`sample_names`) name the
    samples in the predictions and the mistakes as the source does."""

    out.mkdir(parents=True, exist_ok=True)
    headline = {k: m[k] for k in ("accuracy", "macro_f1", "ece", "n")}
    headline["per_class_f1"] = {c: v["f1"] for c, v in m["per_class"].items()}
    fsio.write_json(out / "metrics.json", headline)
    fsio.write_json(out / "evaluation.json", {**m, "tta": modeling.tta_of(cfg)})
    pred = probs.argmax(1)
    classes = np.array(cfg.classes)
    with fsio.atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "path", "actual", "predicted", "confidence"])
        for n, (i, a, p) in enumerate(zip(ids, y, pred, strict=True)):
            writer.writerow([i, (names or {}).get(str(i), ""), classes[a], classes[p], f"{probs[n, p]:.6f}"])
    cm = np.array(m["confusion_matrix"])
    fsio.write_text(out / "confusion_matrix.csv", ",".join(["true\\predicted", *cfg.classes]) + "\n"
                    + "".join(",".join([c, *map(str, r)]) + "\n" for c, r in zip(cfg.classes, cm.tolist(), strict=True)))
    plot_confusion(cm, cfg.classes, out / "confusion_matrix.png")
    plot_reliability(m["calibration_bins"], m["ece"], out / "reliability.png")
    mistakes = out / "mistakes"
    shutil.rmtree(mistakes, ignore_errors=True)  # DVC restores it as a whole; no stale file of another modality
    mistakes.mkdir()
    shown = cfg.kind.present_mistakes(x, y, probs, cfg.classes, prepared, mistakes, names=names)
    fsio.write_json(out / paths.SERVING_FILE, cost)
    return headline, shown


def log_evaluation(run_id: str, out: Path, prepared: Path, headline: dict[str, Any], cost: dict[str, float], cfg,
                   shown: list[Path]) -> None:  # fmt: skip
    """The figures and files into the pipeline's MLflow run (register logs there too)."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    with mlflow.start_run(run_id=run_id):
        tracking.log_datasets(prepared, {"test": "testing"})
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in headline.items() if k != "per_class_f1"})
        mlflow.set_tag("graft.tta", modeling.tta_of(cfg))  # the test-time augmentation these figures include
        mlflow.log_metrics({f"test_f1_{c.replace('/', '_')}": v for c, v in headline["per_class_f1"].items()})
        mlflow.log_metrics({f"serving_{k}": float(v) for k, v in cost.items()})
        for path in [*(out / name for name in ARTIFACTS), *shown]:
            mlflow.log_artifact(str(path), "evaluation")
