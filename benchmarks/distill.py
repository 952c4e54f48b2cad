"""Benchmark knowledge distillation on this machine, in one run, through the real pipeline.

A fresh copy of the project on Fashion-MNIST with 10,000 labelled training images
(1,000 per class; 9,000 train after validation's 10 %) and 2,000 test images:

1. **Teacher:** the default recipe (EfficientNet-Lite0, pretrained, partial fine-tuning,
   64 px), registered as v1 (the champion).
2. **Student without a teacher:** a small network from scratch (``--student``, default
   MobileNetV3-Small 1.0, 1.5 M parameters) at 32 px, trained on the labels alone.
3. **The same student with the teacher:** the same params, epochs and data, plus
   ``distill.teacher: graft-classifier/1``, at each temperature of ``--temperature``
   (the teacher runs once: only ``fine_tune`` and what follows rerun). The one with the
   best *validation* accuracy is the headline; the test split plays no part in the choice.
   Why a sweep: the default teacher was trained with label smoothing, whose softened
   logits are known to make a weaker teacher at high temperatures (Mueller et al., 2019).

Printed as one table: test accuracy, serving latency (ms per image at batch 1, through
the registered pyfunc, from raw PNG bytes), throughput at batch 64, weights size and
training time, and the student's gain from the teacher in accuracy points; plus what the
teacher's cached soft labels cost against running the teacher on every augmented batch.
Every stage is its ``dvc.yaml`` command (``dvc repro``); figures come from the stages'
own reports.

Usage: python benchmarks/distill.py [--json benchmarks/results-cpu.json]
(the figures go under the key "distill"; the file's other keys are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = {"max_train_per_class": 1000, "max_test_per_class": 200}
TEACHER = {"preprocess": {"image_size": 64}, "register": {"min_accuracy": 0.0}}


def student_params(arch: str, size: int, epochs: int, lr: float) -> dict:
    """A network trained from scratch the way one would: every layer at the same learning
    rate (no layer-wise decay: there is no pretrained layer to protect), no early stop,
    no label smoothing (the teacher's soft targets are the smoothing, and the student
    without a teacher must not get a different recipe)."""
    return {
        "preprocess": {"image_size": size},
        "load_pretrained": {"architecture": arch, "source": f"scratch:{arch}"},
        "fine_tune": {"mode": "full", "frozen_groups": 0, "epochs": epochs, "lr": lr, "lr_decay": 1.0,
                      "patience": epochs, "crop_padding": 2, "label_smoothing": 0.0},
    }  # fmt: skip


def repro(project: Path) -> float:
    from tests.conftest import dvc

    t0 = time.perf_counter()
    res = dvc(project, "repro", check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-3000:])
    return time.perf_counter() - t0


def figures(project: Path) -> dict:
    """One trained model's figures, from the stages' own reports."""
    read = lambda rel: json.loads((project / rel).read_text())  # noqa: E731
    model = read("models/fine_tuned/model.json")
    serving = read("reports/evaluate/serving.json")
    return {
        "architecture": model["architecture"], "source": model["source"], "image_size": model["input"]["image_size"],
        "accuracy": read("reports/evaluate/metrics.json")["accuracy"],
        "latency_ms_b1": serving["latency_ms_b1"], "throughput_b64": serving["throughput_b64"],
        "size_mb": serving["size_mb"], "parameters": int(serving["parameters"]),
        "train_seconds": model["training"]["train_seconds"], "epochs_run": model["training"]["epochs_run"],
        "best_val_accuracy": model["training"]["best_val_accuracy"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="mobilenetv3_small_100", help="timm architecture of the student (from scratch)")
    parser.add_argument("--student-size", type=int, default=32, help="the student's input size (px)")
    parser.add_argument("--epochs", type=int, default=20, help="the student's epochs (with and without the teacher)")
    parser.add_argument("--lr", type=float, default=0.008, help="the student's peak learning rate (scratch: the transfer "
                        "benchmark's sweep picked 0.008)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--json", type=Path, help="add the figures to this JSON file under 'distill' (atomically)")
    args = parser.parse_args()

    from benchmarks.transfer import machine_info
    from graft.base import fsio
    from tests.conftest import copy_project, set_params

    with tempfile.TemporaryDirectory(prefix="graft-bench-distill-") as tmp:
        project = copy_project(Path(tmp) / "project")
        set_params(project, ingest=DATA, **TEACHER)
        print("teacher: the default recipe at 64 px ...", flush=True)
        teacher_wall = repro(project)
        teacher = figures(project)
        student = student_params(args.student, args.student_size, args.epochs, args.lr)
        set_params(project, **student)
        print(f"student without a teacher: {args.student} from scratch at {args.student_size} px ...", flush=True)
        alone_wall = repro(project)
        alone = figures(project)
        runs = []
        for temperature in args.temperature:
            set_params(project, distill={"teacher": "graft-classifier/1", "temperature": temperature, "alpha": args.alpha})
            print(f"the same student with the teacher, temperature {temperature:g} ...", flush=True)
            wall = repro(project)
            runs.append({**figures(project), "temperature": temperature, "pipeline_seconds": wall,
                         "decision": json.loads((project / "reports/register/decision.json").read_text())})  # fmt: skip
        teach = json.loads((project / "reports/teach.json").read_text())
        taught = max(runs, key=lambda r: (r["best_val_accuracy"], -r["temperature"]))  # chosen on validation
        decision = taught.pop("decision")
        for r in runs:
            r.pop("decision", None)

    teach_seconds = teach["seconds"]
    out = {
        "machine": machine_info(),
        "data": {"train_labels": 10 * DATA["max_train_per_class"], "test_images": 10 * DATA["max_test_per_class"]},
        "settings": {"student": args.student, "student_size": args.student_size, "epochs": args.epochs, "lr": args.lr,
                     "temperature": taught["temperature"], "temperatures": args.temperature, "alpha": args.alpha},
        "teacher": {**teacher, "pipeline_seconds": teacher_wall},
        "student_alone": {**alone, "pipeline_seconds": alone_wall},
        "student_distilled": taught,
        "distilled_runs": runs,
        "gain_points": 100 * (taught["accuracy"] - alone["accuracy"]),
        "teacher_soft_labels": {
            "seconds": teach_seconds, "samples_per_second": teach["samples_per_second"],
            "teacher_train_accuracy": teach["teachers"][0]["train_accuracy"],
            # Running the teacher on every augmented batch instead: one teacher pass per epoch.
            "on_the_fly_extra_seconds": teach_seconds * taught["epochs_run"],
            "on_the_fly_share_of_training": teach_seconds * taught["epochs_run"] / taught["train_seconds"],
        },
        "register_side_by_side": {k: decision.get(k) for k in ("promote", "reason", "candidate_serving", "champion_serving")},
    }  # fmt: skip
    rows = [("teacher", teacher), ("student, labels only", alone),
            *((f"distilled, T {r['temperature']:g}" + (" *" if r is taught else ""), r) for r in runs)]
    print(f"\n{'model':<22} {'arch':<24} {'px':>3} {'accuracy':>8} {'ms/img b1':>9} {'img/s b64':>9} {'MB':>6} {'train s':>7}")
    for name, f in rows:
        print(f"{name:<22} {f['architecture']:<24} {f['image_size']:>3} {f['accuracy']:>8.4f} {f['latency_ms_b1']:>9.2f} "
              f"{f['throughput_b64']:>9.0f} {f['size_mb']:>6.1f} {f['train_seconds']:>7.0f}")  # fmt: skip
    print(f"\nthe teacher's gain to the student: {out['gain_points']:+.2f} accuracy points (target: +1)")
    print(f"student vs teacher: {taught['latency_ms_b1'] / teacher['latency_ms_b1']:.2f}x the latency, "
          f"{taught['size_mb'] / teacher['size_mb']:.2f}x the size, accuracy {100 * (taught['accuracy'] - teacher['accuracy']):+.2f} points")  # fmt: skip
    s = out["teacher_soft_labels"]
    print(f"cached soft labels: {s['seconds']:.1f} s once; the teacher on every augmented batch would add "
          f"{s['on_the_fly_extra_seconds']:.0f} s ({100 * s['on_the_fly_share_of_training']:.0f} % of the student's training)")
    if args.json:
        results = fsio.read_json(args.json) if args.json.is_file() else {}
        fsio.write_json(args.json, {**results, "distill": out})


if __name__ == "__main__":
    main()
