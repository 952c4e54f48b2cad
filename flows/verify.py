"""Scheduled verification: reproduce the champion (``graft reproduce champion``) and notify
through the webhook when it no longer reproduces. Deployed by ``graft schedule --verify``
on ``verify.cron`` (graft.yaml, weekly by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import reproduce as rep
from flows.notify import notify
from graft.config.params import RegisterParams, load_section
from graft.tracking import runs as tracking


@flow(name="graft-verify", log_prints=True)
def verify_champion(project_dir: str = ".", model_ref: str = "champion") -> dict[str, Any]:
    """Reproduce ``model_ref``; a verdict other than identical (or within tolerance), or
    an input that cannot be rebuilt, is notified as ``reproduction_failed``."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    tracking.configure(root)
    client = mlflow.MlflowClient()
    default_name = load_section(RegisterParams, "register", root / "params.yaml").model_name
    name, version = default_name, "?"
    try:
        name, version = rep.resolve_ref(client, default_name, model_ref)
        outcome, rows, run_id = rep.reproduce(root, client, name, version, logger.info)
    except rep.CannotReproduce as e:
        notify(root, "reproduction_failed", {"model_name": name, "version": version, "verdict": "cannot reproduce",
                                             "reason": str(e)}, logger)  # fmt: skip
        return {"model_name": name, "version": version, "verdict": "cannot reproduce", "reason": str(e)}
    for line in rep.table(rows):
        logger.info(line)
    result = {"model_name": name, "version": version, "verdict": outcome, "run_id": run_id}
    if outcome == rep.DIFFERS:
        notify(root, "reproduction_failed", {**result, "differs": [r.what for r in rows if r.status == rep.DIFFERS]}, logger)
    else:
        logger.info("%s v%s reproduces: %s", name, version, outcome)
    return result
