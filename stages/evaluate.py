"""Stage ``evaluate``: the fine-tuned model on the held-out test split.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.evaluate``): it reads its
params section, calls :mod:`graft.evaluation.metrics` and writes the outputs.
"""

from __future__ import annotations

import argparse
import gc
import shutil
from pathlib import Path

import numpy as np

from graft.base import fsio
from graft.base.errors import GraftError
from graft.config.params import DEFAULT_PARAMS, load_section
from graft.evaluation.metrics import compute_metrics, measure_serving, plot_confusion, plot_reliability, tta_note
from graft.models import modeling
from graft.stage import stage_main


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.evaluate",
        description="Evaluate the fine-tuned model on the test split; write metrics and plots; log to MLflow.",
    )
    parser.add_argument("--raw", required=True, type=Path, help="ingest output directory (raw test samples, for serving cost)")
    parser.add_argument("--prepared", required=True, type=Path, help="preprocess output directory")
    parser.add_argument("--model", required=True, type=Path, help="fine-tuned model directory")
    parser.add_argument("--reports", required=True, type=Path, help="directory for metrics and plots")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)
    from graft.base import threads

    threads.sizer("evaluate")  # before any torch work: the CPUs other processes leave free

    import mlflow

    from graft.config.params import FineTuneParams
    from graft.data.splits import load_split
    from graft.tracking import runs as tracking

    # Validation's batch size: the peak memory of a prediction is one batch's activations.
    batch_size = load_section(FineTuneParams, "fine_tune", args.params).eval_batch_size
    # Serving cost first, in a fresh process, its model freed before the test split is
    # scored: its batch of 64 is the same whatever the data's size, and measured after a
    # whole split's predictions it grew the peak with the data (heap fragmentation).
    cost = measure_serving(args.model, args.raw, args.prepared)
    gc.collect()
    model, cfg = modeling.load(args.model, modeling.resolve_device())
    x, y = load_split(args.prepared, "test")
    ids = np.load(args.prepared / "test_ids.npy")
    probs = modeling.predict_proba(model, x, cfg, batch_size=batch_size, desc="evaluate")
    broken = int((~np.isfinite(probs)).any(1).sum())
    if broken:
        raise GraftError(
            f"evaluate: the model in {args.model} gives non-finite outputs (NaN or inf) for {broken} of {len(probs)} "
            f"test {cfg.kind.SAMPLES}: its weights are broken (training diverged). Retrain with a lower fine_tune.lr."
        )
    m = compute_metrics(y, probs, cfg.classes)

    out = args.reports
    out.mkdir(parents=True, exist_ok=True)
    headline = {k: m[k] for k in ("accuracy", "macro_f1", "ece", "n")}
    headline["per_class_f1"] = {c: v["f1"] for c, v in m["per_class"].items()}
    fsio.write_json(out / "metrics.json", headline)
    fsio.write_json(out / "evaluation.json", {**m, "tta": modeling.tta_of(cfg)})
    pred = probs.argmax(1)
    names = np.array(cfg.classes)
    rows = ["id,actual,predicted,confidence"] + [
        f'{i},"{names[a]}","{names[p]}",{probs[n, p]:.6f}' for n, (i, a, p) in enumerate(zip(ids, y, pred, strict=True))
    ]
    fsio.write_text(out / "predictions.csv", "\n".join(rows) + "\n")
    cm = np.array(m["confusion_matrix"])
    fsio.write_text(out / "confusion_matrix.csv", ",".join(["true\\predicted", *cfg.classes]) + "\n"
                    + "".join(",".join([c, *map(str, r)]) + "\n" for c, r in zip(cfg.classes, cm.tolist(), strict=True)))
    plot_confusion(cm, cfg.classes, out / "confusion_matrix.png")
    plot_reliability(m["calibration_bins"], m["ece"], out / "reliability.png")
    mistakes = out / "mistakes"
    shutil.rmtree(mistakes, ignore_errors=True)  # DVC restores it as a whole; no stale file of another modality
    mistakes.mkdir()
    shown = cfg.kind.present_mistakes(x, y, probs, cfg.classes, args.prepared, mistakes)
    fsio.write_json(out / "serving.json", cost)

    tracking.configure()
    training_run_id = fsio.read_json(args.model / tracking.RUN_FILE)["run_id"]
    run_id = tracking.run_for("evaluate", training_run_id, args.params)
    # register logs into the same run: it reads the id from here (one of its DVC deps).
    fsio.write_json(out / tracking.RUN_FILE, {"run_id": run_id, "training_run_id": training_run_id})
    with mlflow.start_run(run_id=run_id):
        tracking.log_datasets(args.prepared, {"test": "testing"})
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in headline.items() if k != "per_class_f1"})
        mlflow.set_tag("graft.tta", modeling.tta_of(cfg))  # the test-time augmentation these figures include
        mlflow.log_metrics({f"test_f1_{c.replace('/', '_')}": v for c, v in headline["per_class_f1"].items()})
        mlflow.log_metrics({f"serving_{k}": float(v) for k, v in cost.items()})
        for path in [*(out / name for name in ("metrics.json", "evaluation.json", "confusion_matrix.csv",
                                               "confusion_matrix.png", "reliability.png", "predictions.csv",
                                               "serving.json")), *shown]:
            mlflow.log_artifact(str(path), "evaluation")
    print(
        f"evaluate: test accuracy {m['accuracy']:.4f}{tta_note(cfg)}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} "
        f"on {m['n']} {cfg.kind.SAMPLES} -> {out}/ (MLflow run {run_id})\n"
        f"evaluate: serving cost {cost['latency_ms_b1']:.1f} ms per sample at batch 1, {cost['throughput_b64']:.0f} "
        f"samples/s at batch 64, {cost['size_mb']:.1f} MB of weights"
    )

if __name__ == "__main__":
    main()
