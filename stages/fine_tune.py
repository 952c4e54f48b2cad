"""Stage ``fine_tune``: train the new head (and, by mode, part or all of the backbone).

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.fine_tune``): it reads its
params section, calls :mod:`graft.training.fine_tune` and writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from graft.base import distributed, fsio, kernels
from graft.base.errors import STATUS_ENV, fault_point
from graft.config.params import DEFAULT_PARAMS, FineTuneParams, load_section
from graft.models import modeling
from graft.stage import stage_main
from graft.training.fine_tune import (
    Split,
    epoch_logger,
    fingerprint,
    load_distillation,
    plot_learning_curves,
    resumed_logging,
    train,
    with_tta,
    write_history_csv,
)


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.fine_tune",
        description="Fine-tune the pretrained model on the prepared data (params.yaml, section "
        "'fine_tune'); resumes from the last checkpoint after a crash; logs to MLflow.",
    )
    parser.add_argument("--prepared", required=True, type=Path, help="preprocess output directory")
    parser.add_argument("--pretrained", required=True, type=Path, help="load_pretrained output directory")
    parser.add_argument("--out", required=True, type=Path, help="fine-tuned model directory (replaced atomically)")
    parser.add_argument("--history", required=True, type=Path, help="per-epoch history CSV (a DVC plot)")
    parser.add_argument("--plot", required=True, type=Path, help="learning curves PNG")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file for resuming")
    parser.add_argument("--teacher", type=Path, help="teach output directory: distil from its soft labels, if any")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    import mlflow
    import torch

    from graft.base import threads
    from graft.data.splits import load_split
    from graft.tracking import runs as tracking
    from graft.training import teacher as teach

    params = load_section(FineTuneParams, "fine_tune", args.params)
    rk = distributed.current()
    if params.nproc > 1 and not rk.distributed:
        if params.mode == "feature_extraction":
            print(f"fine_tune: fine_tune.nproc={params.nproc} ignored: feature_extraction trains the head on cached "
                  "features, seconds of work for one process")  # fmt: skip
        else:
            # The same stage again, as nproc ranks; the ranks report through this process.
            print(f"fine_tune: {params.nproc} processes under torchrun (DistributedDataParallel, "
                  f"{'NCCL' if modeling.resolve_device(params.device).type == 'cuda' else 'gloo'}); "
                  f"global batch {params.batch_size}", flush=True)  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k != STATUS_ENV}
            code = distributed.launch(params.nproc, "stages.fine_tune", sys.argv[1:] if argv is None else argv, env)
            if code:
                raise SystemExit(f"fine_tune: a rank under torchrun failed (exit code {code}; its output is above); "
                                 "rerun: training resumes from the last epoch's checkpoint")  # fmt: skip
            return
    sizer = threads.sizer("fine_tune" + (f" rank {rk.rank}" if rk.distributed else ""))
    model, cfg = modeling.load(args.pretrained)
    train_split, val_split = (Split(*load_split(args.prepared, s)) for s in ("train", "val"))
    distill, teachers = load_distillation(args.teacher, args.prepared, args.params) if args.teacher else (None, [])
    # Same params, same starting weights, same data: the checkpoint belongs to this run.
    data_hash = fsio.sha256_file(args.prepared / "train_y.npy") + fsio.sha256_file(args.prepared / "train_ids.npy")
    teacher_key = [fsio.sha256_file(distill.logits.path), distill.temperature, distill.alpha] if distill else None
    run_key = fingerprint(asdict(params), fsio.sha256_file(args.pretrained / modeling.WEIGHTS), data_hash,
                          *([teacher_key] if teacher_key else []))  # fmt: skip
    if not rk.leader:  # rank 0 alone logs and writes; the others train with it
        train(model, cfg, train_split, val_split, params, args.checkpoint, run_key, distill=distill, threads=sizer)
        distributed.shutdown()
        return
    previous = torch.load(args.checkpoint, map_location="cpu", weights_only=False) if args.checkpoint.is_file() else {}
    resume_run = previous.get("mlflow_run_id") if previous.get("run_key") == run_key else None

    experiment_id = tracking.configure()
    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    run_name = f"{cfg.architecture}-{params.mode}" + ("-distilled" if distill else "")
    # A resumed run keeps the parent it was created under.
    nest = {} if resume_run or not parent else {"nested": True, "parent_run_id": parent}
    with mlflow.start_run(run_id=resume_run, run_name=None if resume_run else run_name,
                          experiment_id=None if resume_run else experiment_id, **nest) as run:  # fmt: skip
        if not resume_run:
            tracking.log_params_file(args.params)
            mlflow.set_tags({**tracking.run_tags(), "pretrained_weights_sha256": cfg.weights_sha256 or "none",
                             "pretrained_source": cfg.source, "graft.stage": "pipeline"})
            tracking.log_datasets(args.prepared, {"train": "training", "val": "validation"})
            tracking.log_lineage(args.params)
            if distill:
                mlflow.set_tags(teach.lineage_tags(teachers))
                mlflow.log_artifact(str(args.teacher / "teacher.json"), "teacher")
        else:
            resumed_logging(run.info.run_id, previous.get("history", []), parent)
            for extra in ("reports/validation.json", "reports/preprocess.json"):
                if Path(extra).is_file():
                    mlflow.log_artifact(extra, "data")
            mlflow.log_artifact(str(args.pretrained / modeling.CONFIG), "pretrained")

        log_to_mlflow = epoch_logger(mlflow)

        def log_epoch(record: dict[str, Any]) -> None:
            log_to_mlflow(record)
            fault_point(f"fine_tune_after_epoch_{record['epoch']}")  # the checkpoint is on disk by now

        # Checkpoints carry the run id, so a resumed training logs into the same run.
        result = train(model, cfg, train_split, val_split, params, args.checkpoint, run_key,
                       on_epoch=log_epoch, checkpoint_extra={"mlflow_run_id": run.info.run_id}, distill=distill,
                       threads=sizer)
        summary = {
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "train_seconds": sum(h["epoch_seconds"] for h in result.history),
            "samples_per_second_mean": float(np.mean([h["samples_per_second"] for h in result.history])),
            **{f"{k}_parameters": v for k, v in result.parameters.items()},
        }
        with fsio.atomic_dir(args.out) as tmp:
            lineage = {"distilled_from": {"teachers": teachers, "temperature": distill.temperature,
                                          "alpha": distill.alpha}} if distill else {}  # fmt: skip
            modeling.save(tmp, model, with_tta(cfg, params.tta), extra={"mode": params.mode, "training": summary, **lineage},
                          assets=args.pretrained / modeling.ASSETS)
            fsio.write_json(tmp / tracking.RUN_FILE, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
        write_history_csv(result.history, args.history)
        plot_learning_curves(result.history, args.plot, params.label_smoothing, distilled=distill is not None)
        # Summaries get their own names (fit_*): the per-epoch series keep theirs, so no
        # chart mixes one value per epoch with a one-off figure.
        mlflow.log_metrics({f"fit_{k}": float(v) for k, v in summary.items()})
        # What `graft reproduce` compares a rerun's weights with, byte for byte.
        mlflow.set_tag(tracking.WEIGHTS_TAG, fsio.sha256_file(args.out / modeling.WEIGHTS))
        mlflow.set_tag(threads.TAG, sizer.describe())  # why this run's samples/s were what they were
        mlflow.set_tag(kernels.TAG, kernels.current())  # what `graft reproduce` pins on another CPU
        mlflow.log_artifact(str(args.history), "training")
        mlflow.log_artifact(str(args.plot), "training")
    args.checkpoint.unlink(missing_ok=True)  # the final model is saved; nothing to resume
    distributed.shutdown()
    print(
        f"fine_tune: {params.mode}, best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch} "
        f"of {len(result.history)}, {summary['train_seconds']:.0f}s, {summary['samples_per_second_mean']:.0f} samples/s "
        f"-> {args.out} (MLflow run {run.info.run_id})"
    )

if __name__ == "__main__":
    main()
