"""The pipeline's paths, relative to the project root: the one place code names them.

``dvc.yaml`` passes them to the stages as arguments; the CLI, the flows, ``graft diff``
and ``graft reproduce`` read a workspace's outputs through these names.
tests/unit/test_paths.py checks that each is what ``dvc.yaml`` says."""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
DVC_LOCK = Path("dvc.lock")

RAW = Path("data/raw")  # ingest: the snapshot
PREPARED = Path("data/prepared")  # preprocess: the encoded splits
PRETRAINED = Path("models/pretrained")  # load_pretrained: the backbone with a new head
TEACHER = Path("data/teacher")  # teach: the teachers' logits
REFERENCE = Path("data/reference")  # drift: this run's embedding reference
FINE_TUNED = Path("models/fine_tuned")  # fine_tune: the trained model

VALIDATION_REPORT = Path("reports/validation.json")  # validate
PREPROCESS_REPORT = Path("reports/preprocess.json")  # preprocess
METRICS = Path("reports/evaluate/metrics.json")  # evaluate
SERVING_FILE = "serving.json"  # evaluate, beside METRICS: the model's serving cost, measured once (register reads it)
DECISION = Path("reports/register/decision.json")  # register
