"""The teacher of knowledge distillation: its soft predictions on the training samples
(``distill`` in params.yaml; ``fine_tune`` trains the student), and the record of who
taught a student. Loading a registered teacher is :mod:`graft.registry.teachers`.

The teacher is a registered model (``champion`` or another alias of
``register.model_name``, ``name@alias``, ``name/version``, a bare version number), a
graft model directory, or a list of them (an ensemble). Each one sees the raw training
samples through its *own* preprocessing (its image size, its tokenizer), from the
snapshot, so a student at 32 px can learn from a teacher at 96 px.

Output (``data/teacher/``, replaced atomically): ``logits.npy`` float32 (N, M, C), the
logits of the M teachers for the N training samples in the prepared train order, with
classes in the data's order; ``teacher.json``, who the teachers are (registered version,
run id, weights sha256). Logits, not probabilities: the temperature is the student's
hyperparameter, so changing it never reruns a teacher. With no teacher the folder holds
only ``teacher.json`` saying so.

DVC reruns this stage when the data or ``distill.teacher`` change, not when a moving
alias (``champion``) moves: a rerun gives the same result, and the teacher a student
learnt from is recorded in ``teacher.json``, the model and its registry entry. To
distil from the new champion, ``dvc repro -f teach`` (or pin ``name/version``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graft.base import fsio
from graft.base.errors import GraftError, progress
from graft.models import modeling

LOGITS, INFO = "logits.npy", "teacher.json"
# Samples per teacher forward. Fixed, not a param: the logits must not depend on anything
# but the teacher and the data. 64 was the CPU's fastest batch (fine_tune._features).
BATCH = 64




@dataclass
class Teacher:
    """A loaded teacher and where it came from."""

    reference: str
    model: Any
    cfg: modeling.ModelConfig
    encoder: Any
    model_dir: Path
    lineage: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"reference": self.reference, **self.lineage, "architecture": self.cfg.architecture,
                "modality": self.cfg.modality, "input": self.cfg.input, "classes": list(self.cfg.classes),
                "weights_sha256": fsio.sha256_file(self.model_dir / modeling.WEIGHTS)}  # fmt: skip


def class_order(teacher: Teacher, classes: list[str], modality: str) -> np.ndarray:
    """Indices that put the teacher's logits in the data's class order; a GraftError if
    the teacher predicts other classes or reads another kind of sample."""
    if teacher.cfg.modality != modality:
        raise GraftError(f"distill.teacher: '{teacher.reference}' is a{'n' if teacher.cfg.modality[0] in 'aeiou' else ''} "
                         f"{teacher.cfg.modality} model; this data is {modality}")  # fmt: skip
    mine, theirs = set(classes), set(teacher.cfg.classes)
    if mine != theirs:
        detail = []
        if mine - theirs:
            detail.append(f"it does not know {sorted(mine - theirs)}")
        if theirs - mine:
            detail.append(f"it predicts {sorted(theirs - mine)}, which this data does not have")
        raise GraftError(f"distill.teacher: '{teacher.reference}' was trained on other classes: {'; '.join(detail)}. "
                         "A teacher must predict exactly the data's classes.")  # fmt: skip
    return np.array([list(teacher.cfg.classes).index(c) for c in classes])


def soft_labels(teachers: list[Teacher], samples, classes: list[str], out: Path, batch_size: int = BATCH) -> np.ndarray:
    """Write every teacher's logits (N, M, C) for ``samples`` (a :class:`RawSamples`) to
    ``out``, each teacher encoding the raw samples its own way; one pass over the snapshot.
    Returns the teachers' accuracies against the labels."""
    import torch  # torch: ~2 s of import, paid where a model runs

    orders = [class_order(t, classes, samples.modality.NAME) for t in teachers]
    device = modeling.resolve_device("auto")
    for t in teachers:
        t.model.to(device).eval()
    n = len(samples)
    logits = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, len(teachers), len(classes)))
    column = samples.modality.INPUT_COLUMN
    truth = np.array([classes.index(c) for c in samples.truth])
    correct = np.zeros(len(teachers), dtype=np.int64)
    with torch.inference_mode():
        for positions, frame in progress(samples.batches(batch_size), total=math.ceil(n / batch_size),
                                         desc="teacher soft labels", unit="batch"):  # fmt: skip
            values = list(frame[column])
            for m, (t, order) in enumerate(zip(teachers, orders, strict=True)):
                z = t.model(modeling.to_input(t.encoder.batch(values), t.cfg, device)).float().cpu().numpy()
                logits[positions, m] = z[:, order]
                correct[m] += int((z[:, order].argmax(1) == truth[positions]).sum())
    logits.flush()
    del logits  # written through a memory map: pages go to disk, not to this process
    return correct / max(n, 1)


def read(teacher_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """teach's output: the teachers' description, and the logits file (None: no teacher)."""
    info_path = Path(teacher_dir) / INFO
    if not info_path.is_file():
        raise GraftError(f"{info_path}: not found. Run the teach stage first (`dvc repro teach`).")
    info = fsio.read_json(info_path)
    return info, (Path(teacher_dir) / LOGITS if info.get("teachers") else None)




def lineage_name(teacher: dict[str, Any]) -> str:
    """How people read a teacher: ``graft-classifier v3``, or its folder."""
    if teacher.get("version"):
        return f"{teacher['model_name']} v{teacher['version']}"
    return teacher.get("model_dir") or teacher.get("reference", "?")


def lineage_tags(teachers: list[dict[str, Any]]) -> dict[str, str]:
    """The teachers on a student's MLflow run (and model version): names, runs, weights."""
    return {"graft.teacher": ", ".join(lineage_name(t) for t in teachers),
            "graft.teacher_run_id": ", ".join(t.get("training_run_id") or "-" for t in teachers),
            "graft.teacher_weights_sha256": ", ".join(t["weights_sha256"] for t in teachers)}
