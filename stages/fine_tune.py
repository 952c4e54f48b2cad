"""Stage ``fine_tune``: train the new head (and, by mode, part or all of the backbone).

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.fine_tune``): it reads its
params section, calls :mod:`graft.training.fine_tune` and writes the outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graft.base import distributed
from graft.config.params import DEFAULT_PARAMS, FineTuneParams, load_section
from graft.stage import stage_main, thread_sizer
from graft.training import run as ft_run
from graft.training.fine_tune import train


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

    import mlflow  # 1.5 to 2 s of import: after the arguments are checked


    params = load_section(FineTuneParams, "fine_tune", args.params)
    if ft_run.relaunch_under_torchrun(params, "stages.fine_tune", sys.argv[1:] if argv is None else argv):
        return
    rk = distributed.current()
    # torchrun's ranks keep their first size: one record could not replay every rank's changes
    sizer = thread_sizer("fine_tune" + (f" rank {rk.rank}" if rk.distributed else ""), resize=not rk.distributed,
                         training=True)  # fmt: skip
    inputs = ft_run.load_inputs(params, args.prepared, args.pretrained, args.teacher, args.params)
    fit = dict(distill=inputs.distill, threads=sizer)
    if not rk.leader:  # rank 0 alone logs and writes; the others train with it
        train(inputs.model, inputs.cfg, inputs.train, inputs.val, params, args.checkpoint, inputs.run_key, **fit)
        distributed.shutdown()
        return
    where = {"params": args.params, "prepared": args.prepared, "pretrained": args.pretrained, "teacher": args.teacher}
    with ft_run.tracked_run(inputs, params, args.checkpoint, where) as run:
        # Checkpoints carry the run id, so a resumed training logs into the same run.
        result = train(inputs.model, inputs.cfg, inputs.train, inputs.val, params, args.checkpoint, inputs.run_key,
                       on_epoch=ft_run.on_epoch_logged(mlflow), checkpoint_extra={"mlflow_run_id": run.info.run_id},
                       **fit)  # fmt: skip
        facts = ft_run.save_outputs(inputs, params, result, run, args.out, args.history, args.plot, args.pretrained,
                                    sizer.describe())  # fmt: skip
    args.checkpoint.unlink(missing_ok=True)  # the final model is saved; nothing to resume
    distributed.shutdown()
    print(
        f"fine_tune: {params.mode}, best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch} "
        f"of {len(result.history)}, {facts['train_seconds']:.0f}s, {facts['samples_per_second_mean']:.0f} samples/s "
        f"-> {args.out} (MLflow run {run.info.run_id})"
    )


if __name__ == "__main__":
    main()
