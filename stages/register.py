"""Stage ``register``: log the fine-tuned model to the MLflow registry and decide, on the same evaluation data, whether it becomes ``champion`` or stays ``challenger``.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.register``): it reads its
params section, calls :mod:`graft.promotion.register` and writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from graft.base import fsio
from graft.config import paths
from graft.config.params import DEFAULT_PARAMS, RegisterParams, load_section
from graft.promotion.register import alias_of, format_decision, params_hash, register
from graft.stage import stage_main, thread_sizer
from graft.tracking import runs as tracking


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.register",
        description="Register the fine-tuned model in MLflow and promote it to champion only if it "
        "beats the current champion on the same test samples (params.yaml, section 'register').",
    )
    parser.add_argument("--model", required=True, type=Path, help="fine-tuned model directory")
    parser.add_argument("--raw", required=True, type=Path, help="ingest output directory (raw test samples)")
    parser.add_argument("--prepared", required=True, type=Path, help="preprocess output directory (test ids)")
    parser.add_argument("--metrics", required=True, type=Path, help="evaluate's metrics.json")
    parser.add_argument("--decision", required=True, type=Path, help="decision report JSON to write")
    parser.add_argument("--reference", type=Path, help="the drift stage's reference (data/reference), kept with the version")
    parser.add_argument("--drift", type=Path, help="the drift stage's report directory (reports/drift)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    thread_sizer("register")  # before any torch work: the CPUs other processes leave free

    # Loading the two models for the gate would draw MLflow's download bars into the log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    params = load_section(RegisterParams, "register", args.params)
    tracking.configure()
    runs = fsio.read_json(args.metrics.parent / tracking.RUN_FILE)  # written by evaluate
    metrics = {k: float(v) for k, v in fsio.read_json(args.metrics).items() if k in ("accuracy", "macro_f1", "ece")}
    run_id = tracking.run_for("register", runs["run_id"], args.params)
    if run_id != runs["run_id"]:  # a run of its own: it carries the test metrics it registers with
        import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

        mlflow.MlflowClient().log_batch(run_id, metrics=[mlflow.entities.Metric(f"test_{k}", v, int(time.time() * 1000), 0)
                                                         for k, v in metrics.items()])  # fmt: skip
    run_tags = tracking.run_tags()
    tags = {k: v for k, v in run_tags.items() if k in ("git_dirty", "data_version", "prefect_flow_run_id")}
    tags.update({"git_commit": run_tags[tracking.GIT_COMMIT_TAG], "params_hash": params_hash(args.params),
                 "mlflow_run_id": run_id, "training_run_id": runs["training_run_id"]})  # fmt: skip
    # evaluate's measurement of this model's serving cost: read, not a dependency (timings
    # alone must not register a new version), and not measured a second time
    cost_file = args.metrics.parent / paths.SERVING_FILE
    cost = fsio.read_json(cost_file) if cost_file.is_file() else None
    decision, version = register(args.model, args.raw, args.prepared, params, run_id, tags, metrics,
                                 args.reference, args.drift, cost)  # fmt: skip
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    mlflow.MlflowClient().set_tag(run_id, tracking.REGISTERED_TAG, f"{params.model_name}/{version}")
    report: dict[str, Any] = {"model_name": params.model_name, "version": version,
                              "alias": alias_of(decision), **decision.to_json()}  # fmt: skip
    fsio.write_json(args.decision, report)
    print(format_decision(decision, params.model_name, version))
    print(f"register: decision written to {args.decision}")
    if os.environ.get(tracking.PARENT_RUN_ENV):
        import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

        mlflow.MlflowClient().set_tag(os.environ[tracking.PARENT_RUN_ENV], "graft.decision", report["alias"])

if __name__ == "__main__":
    main()
