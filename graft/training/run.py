"""A fine-tuning run as the ``fine_tune`` stage runs it, around the loop of
:mod:`graft.training.fine_tune`: its inputs (the pretrained model, the splits, the
teacher's soft labels, the checkpoint's key), its MLflow run (created, or resumed with
the epochs the server missed), and its outputs (the model folder, the history, the
learning curves). Under ``fine_tune.nproc`` > 1 the stage restarts itself under torchrun.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graft.base import distributed, fsio, kernels, plots, threads
from graft.base.arrays import NpyReader
from graft.base.errors import STATUS_ENV, GraftError, fault_point
from graft.config import paths
from graft.config.params import DistillParams, FineTuneParams, load_section
from graft.data.splits import load_split
from graft.models import modeling
from graft.tracking import runs as tracking
from graft.training import teacher as teach
from graft.training.fine_tune import Distillation, Split, TrainResult, fingerprint, with_tta


def relaunch_under_torchrun(params: FineTuneParams, module: str, argv: list[str]) -> bool:
    """With ``fine_tune.nproc`` > 1 outside torchrun: run the stage again as nproc ranks
    (this process reports for them) and return True; False when this process trains."""
    rk = distributed.current()
    if params.nproc <= 1 or rk.distributed:
        return False
    if params.mode == "feature_extraction":
        print(f"fine_tune: fine_tune.nproc={params.nproc} ignored: feature_extraction trains the head on cached "
              "features, seconds of work for one process")  # fmt: skip
        return False
    print(f"fine_tune: {params.nproc} processes under torchrun (DistributedDataParallel, "
          f"{'NCCL' if modeling.resolve_device(params.device).type == 'cuda' else 'gloo'}); "
          f"global batch {params.batch_size}", flush=True)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != STATUS_ENV}
    code = distributed.launch(params.nproc, module, argv, env)
    if code:
        raise SystemExit(f"fine_tune: a rank under torchrun failed (exit code {code}; its output is above); "
                         "rerun: training resumes from the last epoch's checkpoint")  # fmt: skip
    return True


@dataclass
class Inputs:
    """What a fine-tuning run starts from, and the key that says whether a checkpoint on
    disk belongs to it (same params, same starting weights, same data, same teacher)."""

    model: Any
    cfg: modeling.ModelConfig
    train: Split
    val: Split
    distill: Distillation | None
    teachers: list[dict[str, Any]]
    run_key: str


def load_inputs(params: FineTuneParams, prepared: Path, pretrained: Path, teacher: Path | None,
                params_path: Path) -> Inputs:  # fmt: skip

    model, cfg = modeling.load(pretrained)
    train_split, val_split = (Split(*load_split(prepared, s)) for s in ("train", "val"))
    distill, teachers = load_distillation(teacher, prepared, params_path) if teacher else (None, [])
    data_hash = fsio.sha256_file(prepared / "train_y.npy") + fsio.sha256_file(prepared / "train_ids.npy")
    teacher_key = [fsio.sha256_file(distill.logits.path), distill.temperature, distill.alpha] if distill else None
    run_key = fingerprint(asdict(params), fsio.sha256_file(pretrained / modeling.WEIGHTS), data_hash,
                          *([teacher_key] if teacher_key else []))  # fmt: skip
    return Inputs(model, cfg, train_split, val_split, distill, teachers, run_key)


@contextmanager
def tracked_run(inputs: Inputs, params: FineTuneParams, checkpoint: Path, where: dict[str, Path]) -> Iterator[Any]:
    """The run's MLflow run: the one its checkpoint names when training resumes (with the
    epochs the server never received logged now), else a new one under the pipeline's
    parent run with params, tags, datasets and lineage. ``where``: the params file and the
    prepared, pretrained and teacher folders."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read
    import torch  # torch: ~2 s of import, paid where a model runs

    previous = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint.is_file() else {}
    resume_run = previous.get("mlflow_run_id") if previous.get("run_key") == inputs.run_key else None
    experiment_id = tracking.configure()
    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    run_name = f"{inputs.cfg.architecture}-{params.mode}" + ("-distilled" if inputs.distill else "")
    # A resumed run keeps the parent it was created under.
    nest: dict[str, Any] = {} if resume_run or not parent else {"nested": True, "parent_run_id": parent}
    with mlflow.start_run(run_id=resume_run, run_name=None if resume_run else run_name,
                          experiment_id=None if resume_run else experiment_id, **nest) as run:  # fmt: skip
        if not resume_run:
            tracking.log_params_file(where["params"])
            mlflow.set_tags({**tracking.run_tags(), "pretrained_weights_sha256": inputs.cfg.weights_sha256 or "none",
                             "pretrained_source": inputs.cfg.source, "graft.stage": "pipeline"})
            tracking.log_datasets(where["prepared"], {"train": "training", "val": "validation"})
            tracking.log_lineage(where["params"])
            if inputs.distill:
                mlflow.set_tags(teach.lineage_tags(inputs.teachers))
                mlflow.log_artifact(str(where["teacher"] / "teacher.json"), "teacher")
        else:
            resumed_logging(run.info.run_id, previous.get("history", []), parent)
            for extra in (paths.VALIDATION_REPORT, paths.PREPROCESS_REPORT):
                if extra.is_file():
                    mlflow.log_artifact(str(extra), "data")
            mlflow.log_artifact(str(where["pretrained"] / modeling.CONFIG), "pretrained")
        yield run


def on_epoch_logged(mlflow) -> Callable[[dict[str, Any]], None]:
    log_to_mlflow = epoch_logger(mlflow)

    def log_epoch(record: dict[str, Any]) -> None:
        log_to_mlflow(record)
        fault_point(f"fine_tune_after_epoch_{record['epoch']}")  # the checkpoint is on disk by now

    return log_epoch


def summary(result: TrainResult) -> dict[str, Any]:
    return {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "train_seconds": sum(h["epoch_seconds"] for h in result.history),
        "samples_per_second_mean": float(np.mean([h["samples_per_second"] for h in result.history])),
        **{f"{k}_parameters": v for k, v in result.parameters.items()},
    }


def save_outputs(inputs: Inputs, params: FineTuneParams, result: TrainResult, run, out: Path, history: Path,
                 plot: Path, pretrained: Path, threads_tag: str) -> dict[str, Any]:  # fmt: skip
    """The model folder (atomically, with its run id and what it was distilled from), the
    history CSV, the learning curves, and the run's summary metrics and tags; the summary."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    facts = summary(result)
    distill = inputs.distill
    with fsio.atomic_dir(out) as tmp:
        lineage = {"distilled_from": {"teachers": inputs.teachers, "temperature": distill.temperature,
                                      "alpha": distill.alpha}} if distill else {}  # fmt: skip
        modeling.save(tmp, inputs.model, with_tta(inputs.cfg, params.tta),
                      extra={"mode": params.mode, "training": facts, **lineage}, assets=pretrained / modeling.ASSETS)
        fsio.write_json(tmp / tracking.RUN_FILE, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
    write_history_csv(result.history, history)
    plot_learning_curves(result.history, plot, params.label_smoothing, distilled=distill is not None)
    # Summaries get their own names (fit_*): the per-epoch series keep theirs, so no
    # chart mixes one value per epoch with a one-off figure.
    mlflow.log_metrics({f"fit_{k}": float(v) for k, v in facts.items()})
    # What `graft reproduce` compares a rerun's weights with, byte for byte.
    mlflow.set_tag(tracking.WEIGHTS_TAG, fsio.sha256_file(out / modeling.WEIGHTS))
    # The pool's sizes, step by step: part of what the weights are (graft reproduce replays them)
    mlflow.set_tag(threads.TAG, threads_tag)
    mlflow.set_tag(kernels.TAG, kernels.current())  # what `graft reproduce` pins on another CPU
    mlflow.set_tag(kernels.TORCH_TAG, kernels.torch_version())
    mlflow.log_artifact(str(history), "training")
    mlflow.log_artifact(str(plot), "training")
    return facts


def plot_learning_curves(history: list[dict[str, Any]], path: Path, label_smoothing: float = 0.0,
                         distilled: bool = False) -> None:  # fmt: skip
    from matplotlib.ticker import MaxNLocator  # matplotlib: ~0.6 s of import, paid where a plot is drawn

    plt = plots.pyplot()

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style, label in (("train", "-o", "train (augmented batches, dropout on)"), ("val", "-s", "val")):
        ax1.plot(epochs, [h[f"{key}_loss"] for h in history], style, label=label)
        ax2.plot(epochs, [h[f"{key}_accuracy"] for h in history], style, label=label)
    smoothing = f", label smoothing {label_smoothing:g}" if label_smoothing else ""
    # A student's training loss is the distillation objective; validation stays cross-entropy.
    what = f"train: distillation objective; val: cross-entropy{smoothing}" if distilled else f"cross-entropy{smoothing}"
    ax1.set(title=f"loss ({what})", xlabel="epoch")
    ax2.set(title="accuracy", xlabel="epoch")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("fine_tune: learning curves")
    fig.tight_layout()
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_history_csv(history: list[dict[str, Any]], path: Path) -> None:
    keys = ["epoch", "train_loss", "val_loss", "val_nll", "train_accuracy", "val_accuracy", "epoch_seconds",
            "samples_per_second"]  # fmt: skip
    lines = [",".join(keys)] + [",".join(f"{h[k]:.6g}" if isinstance(h[k], float) else str(h[k]) for k in keys) for h in history]
    fsio.write_text(path, "\n".join(lines) + "\n")


def epoch_logger(mlflow) -> Callable[[dict[str, Any]], None]:
    def log_epoch(record: dict[str, Any]) -> None:
        mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "epoch"}, step=record["epoch"])

    return log_epoch


def resumed_logging(run_id: str, history: list[dict[str, Any]], parent: str | None) -> None:
    """A training resumed from its checkpoint: log the epochs the tracking server never
    received (it was down, or the process died between checkpoint and logging), and move
    the run under this pipeline run's parent, saying where it started."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    client = mlflow.MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    missing = [h for h in history if h["epoch"] not in logged]
    for record in missing:
        epoch_logger(mlflow)(record)
    if missing:
        print(f"fine_tune: logged {len(missing)} epoch(s) of metrics that had not reached the tracking server")
    first = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    if parent and first != parent:
        client.set_tag(run_id, "mlflow.parentRunId", parent)
        client.set_tag(run_id, "graft.resumed", f"training started under parent run {first or 'none'}, "
                                                f"resumed from its checkpoint under {parent}")  # fmt: skip


TEACHER_KEYS = ("reference", "model_name", "version", "run_id", "training_run_id", "model_dir", "architecture",
                "weights_sha256")  # what a student's model.json keeps of each teacher


def load_distillation(teacher_dir: Path, prepared: Path, params_path: Path) -> tuple[Distillation | None, list[dict[str, Any]]]:
    """The teach stage's soft labels, checked against this training split, with the
    distill params; (None, []) when there is no teacher."""
    info, logits_path = teach.read(teacher_dir)
    if logits_path is None:
        return None, []
    p = load_section(DistillParams, "distill", params_path)
    if info.get("train_ids_sha256") != fsio.sha256_file(prepared / "train_ids.npy"):
        raise GraftError(f"{teacher_dir}: the teacher's soft labels are for other training samples than {prepared}; "
                         "rerun the teach stage (`dvc repro teach`)")  # fmt: skip
    logits = NpyReader(logits_path)
    if logits.shape[0] != info["samples"]:
        raise GraftError(f"{logits_path}: {logits.shape[0]} rows, teacher.json says {info['samples']}; rerun teach")
    teachers = [{k: t[k] for k in TEACHER_KEYS if k in t} for t in info["teachers"]]
    return Distillation(logits, p.temperature, p.alpha), teachers
