"""Stage ``evaluate``: the fine-tuned model on the held-out test split.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.evaluate``): it reads its
params section, calls :mod:`graft.evaluation.metrics` and writes the outputs.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from graft.base import fsio
from graft.config.params import DEFAULT_PARAMS, FineTuneParams, load_section
from graft.evaluation.metrics import (
    compute_metrics,
    log_evaluation,
    measure_serving,
    sample_names,
    score_test_split,
    tta_note,
    write_reports,
)
from graft.stage import stage_main, thread_sizer
from graft.tracking import runs as tracking


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

    thread_sizer("evaluate")  # before any torch work: the CPUs other processes leave free

    # Validation's batch size: the peak memory of a prediction is one batch's activations.
    batch_size = load_section(FineTuneParams, "fine_tune", args.params).eval_batch_size
    # Serving cost first, in a fresh process, its model freed before the test split is
    # scored: its batch of 64 is the same whatever the data's size, and measured after a
    # whole split's predictions it grew the peak with the data (heap fragmentation).
    cost = measure_serving(args.model, args.raw, args.prepared)
    gc.collect()
    cfg, x, y, ids, probs = score_test_split(args.model, args.prepared, batch_size)
    m = compute_metrics(y, probs, cfg.classes)
    out = args.reports
    headline, shown = write_reports(out, m, cfg, x, y, ids, probs, args.prepared, cost, sample_names(args.raw))

    tracking.configure()
    training_run_id = fsio.read_json(args.model / tracking.RUN_FILE)["run_id"]
    run_id = tracking.run_for("evaluate", training_run_id, args.params)
    # register logs into the same run: it reads the id from here (one of its DVC deps).
    fsio.write_json(out / tracking.RUN_FILE, {"run_id": run_id, "training_run_id": training_run_id})
    log_evaluation(run_id, out, args.prepared, headline, cost, cfg, shown)
    print(
        f"evaluate: test accuracy {m['accuracy']:.4f}{tta_note(cfg)}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} "
        f"on {m['n']} {cfg.kind.SAMPLES} -> {out}/ (MLflow run {run_id})\n"
        f"evaluate: serving cost {cost['latency_ms_b1']:.1f} ms per sample at batch 1, {cost['throughput_b64']:.0f} "
        f"samples/s at batch 64, {cost['size_mb']:.1f} MB of weights"
    )

if __name__ == "__main__":
    main()
