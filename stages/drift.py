"""Stage ``drift``: has the data moved since the champion was trained? A gate in the pretrained backbone's embedding space, before training.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.drift``): it reads its
params section, calls :mod:`graft.drift.gate` and writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from graft.base import fsio
from graft.config.params import DEFAULT_PARAMS, DriftParams, LoadPretrainedParams, RegisterParams, load_section
from graft.drift import gate
from graft.stage import stage_main, thread_sizer


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.drift",
        description="The drift gate: embed a sample of the training data with the pretrained backbone (this run's "
        "reference, for the models it trains), and test it against the champion's reference (params.yaml, "
        "section 'drift'). on_drift: fail stops the pipeline here, before training, with exit code 2.",
    )
    parser.add_argument("--raw", required=True, type=Path, help="ingest output directory (the raw samples)")
    parser.add_argument("--prepared", required=True, type=Path, help="preprocess output directory (train split, classes)")
    parser.add_argument("--pretrained", required=True, type=Path, help="load_pretrained output directory (the backbone)")
    parser.add_argument("--out", required=True, type=Path, help="this run's reference directory (replaced atomically)")
    parser.add_argument("--report", required=True, type=Path, help=f"report directory ({gate.REPORT}, {gate.PLOT})")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    thread_sizer("drift")  # before any torch work: the CPUs other processes leave free

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    p = load_section(DriftParams, "drift", args.params)
    seed = load_section(LoadPretrainedParams, "load_pretrained", args.params).seed
    model_name = load_section(RegisterParams, "register", args.params).model_name
    t0 = time.perf_counter()
    run = gate.embed_training_sample(args.raw, args.prepared, args.pretrained, p, seed)
    with fsio.atomic_dir(args.out) as tmp:
        gate.write_reference(tmp, run.embeddings, run.labels, run.classes, run.embedder,
                             {"split": "train", "train_ids_sha256": fsio.sha256_file(args.prepared / "train_ids.npy")})  # fmt: skip
    report, ref_emb, new = gate.test_run(run, p, model_name)
    report["seconds"] = time.perf_counter() - t0
    gate.write_report(args.report, report, ref_emb, new)
    gate.log_to_parent_run(args.report, report)
    print(gate.summary(report) + f"\n  ({report['seconds']:.1f}s; reference for this run: {len(run.embeddings)} samples "
          f"-> {args.out}; report -> {args.report / gate.REPORT})")  # fmt: skip
    stop = gate.failure(report, p, args.report)
    if stop is not None:
        raise stop


if __name__ == "__main__":
    main()
