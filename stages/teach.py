"""Stage ``teach``: a teacher's soft predictions on the training samples, for knowledge distillation (``distill`` in params.yaml; ``fine_tune`` trains the student).

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.teach``): it reads its
params section, calls :mod:`graft.training.teacher` and writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from graft.base import fsio
from graft.config.params import DEFAULT_PARAMS, DistillParams, RegisterParams, load_section
from graft.data.samples import RawSamples
from graft.registry.teachers import load_teacher
from graft.stage import stage_main, thread_sizer
from graft.training.teacher import BATCH, INFO, LOGITS, class_order, lineage_name, soft_labels


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.teach",
        description="Knowledge distillation, step one: the teacher's (or teachers') soft predictions on the "
        "training samples, each teacher with its own preprocessing (params.yaml, section 'distill'). "
        "With distill.teacher null it records that there is no teacher.",
    )
    parser.add_argument("--raw", required=True, type=Path, help="ingest output directory (the raw samples)")
    parser.add_argument("--prepared", required=True, type=Path, help="preprocess output directory (train order, classes)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    parser.add_argument("--report", required=True, type=Path, help="JSON report to write (time, teacher accuracy)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    params = load_section(DistillParams, "distill", args.params)
    if not params.references:  # the default: nothing to run, so no torch to import (2 s of start-up)
        with fsio.atomic_dir(args.out) as tmp:
            fsio.write_json(tmp / INFO, {"teachers": []})
        fsio.write_json(args.report, {"teachers": []})
        print("teach: no teacher (distill.teacher is null): the student trains on labels alone")
        return

    thread_sizer("teach")  # before any torch work: the CPUs other processes leave free

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    model_name = load_section(RegisterParams, "register", args.params).model_name
    # Every teacher is loaded and checked before any is run: a bad entry costs no inference.
    teachers = [load_teacher(ref, model_name) for ref in params.references]
    classes = list(fsio.read_json(args.prepared / "meta.json")["classes"])
    samples = RawSamples(args.raw, args.prepared, "train")
    for t in teachers:
        class_order(t, classes, samples.modality.NAME)
    t0 = time.perf_counter()
    with fsio.atomic_dir(args.out) as tmp:
        accuracy = soft_labels(teachers, samples, classes, tmp / LOGITS, BATCH)
        info = {"teachers": [t.describe() for t in teachers], "classes": classes, "split": "train",
                "samples": len(samples), "train_ids_sha256": fsio.sha256_file(args.prepared / "train_ids.npy")}  # fmt: skip
        fsio.write_json(tmp / INFO, info)
    seconds = time.perf_counter() - t0
    fsio.write_json(args.report, {"seconds": seconds, "samples_per_second": len(samples) / seconds,
                                  "teachers": [{"reference": t.reference, "train_accuracy": float(a)}
                                               for t, a in zip(teachers, accuracy, strict=True)]})  # fmt: skip
    names = ", ".join(lineage_name(d) for d in info["teachers"])
    print(f"teach: soft labels of {names} on {len(samples)} training {samples.modality.SAMPLES} in {seconds:.1f}s "
          f"(teacher train accuracy {', '.join(f'{a:.4f}' for a in accuracy)}) -> {args.out}")

if __name__ == "__main__":
    main()
