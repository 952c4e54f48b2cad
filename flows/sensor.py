"""Retrain when the data changes: a light flow that fingerprints the ingest source and
starts the training flow only if the source differs from the one the last successful
training run accepted.

The fingerprint (``flows/fingerprint.py``) reads file names, sizes and modification
times, so a check of a large image folder costs a directory walk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.fingerprint import fingerprint, last_accepted
from graft.base import fsio
from graft.base.errors import GraftError
from graft.config import paths
from graft.config.params import DriftParams, RegisterParams, load_section
from graft.drift import gate as drift
from graft.drift.gate import summary

# trigger=drift: the changed source last found not to have drifted (so the next check of the
# same files costs a fingerprint, not an embedding of the data)
CHECKED = Path(".graft") / "drift_checked_source.json"


def source_drift(root: Path) -> dict[str, Any]:
    """The drift stage's test of the ingest source (before ingest) against the reference
    that ``drift.reference`` names (the champion's): the report."""

    params_path = root / "params.yaml"
    p = load_section(DriftParams, "drift", params_path)
    if p.reference is None:
        return {"verdict": "no_reference", "reason": "drift.reference is null"}
    model_name = load_section(RegisterParams, "register", params_path).model_name
    with tempfile.TemporaryDirectory() as dst:
        reference, why = drift.resolve(p.reference, model_name, Path(dst))
        if reference is None:
            return {"verdict": "no_reference", "reason": why}
        report, _ = drift.test_items(drift.source_items(root, params_path), reference, p, root / paths.PRETRAINED)
    return report


@flow(name="graft-data-sensor", log_prints=True)
def data_sensor(project_dir: str = ".", concurrency: str = "skip", trigger: str = "change") -> dict[str, Any]:
    """Start the training flow if the ingest source changed since the last accepted run
    (``trigger="drift"``: and drifted from the champion's reference, or there is no
    reference to test against); otherwise log why not and return."""
    from flows.training import training_pipeline  # the flow module: Prefect comes with it, paid only here
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    current = fingerprint(root)
    previous = last_accepted(root)
    if previous is not None and previous["fingerprint"] == current["fingerprint"]:
        logger.info("data sensor: %s unchanged (%d files); no training run", current["path"], current["files"])
        return {"triggered": False, "fingerprint": current}
    why = "no accepted run yet" if previous is None else f"{previous['files']} -> {current['files']} files, content changed"
    if trigger == "drift" and previous is not None and "error" not in current:
        checked = root / CHECKED
        if checked.is_file() and fsio.read_json(checked).get("fingerprint") == current["fingerprint"]:
            logger.info("data sensor: %s changed but did not drift when last checked; no training run", current["path"])
            return {"triggered": False, "fingerprint": current, "drift": "no_drift"}
        try:
            report = source_drift(root)
        except GraftError as e:  # the test cannot run here: a change is reason enough
            report = {"verdict": "skipped", "reason": str(e)}

        logger.info("data sensor: %s", summary({"warnings": [report.get("reason", "")], **report}))
        if report["verdict"] == "no_drift":
            fsio.write_json(checked, {**current, "p_value": report["overall"]["p_adjusted"]})
            logger.info("data sensor: %s changed (%s) but did not drift; no training run", current["path"], why)
            return {"triggered": False, "fingerprint": current, "drift": "no_drift"}
        why += f"; drift check: {report['verdict']}"
    logger.info("data sensor: %s changed (%s); starting the training flow", current["path"], why)
    result = training_pipeline(project_dir=str(root), concurrency=concurrency)
    return {"triggered": True, "fingerprint": current, "summary": result}
