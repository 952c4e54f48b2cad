"""MLflow tracking: where runs go, and what every run carries (params, data version,
code version).

The default store is a SQLite file plus an artifact folder under ``mlruns/`` in the
project (git-ignored); ``MLFLOW_TRACKING_URI`` overrides it, ``MLFLOW_EXPERIMENT_NAME``
picks the experiment (default ``graft``). A pipeline run is one MLflow run, started by
``fine_tune``; ``evaluate`` and ``register`` log into it by id. When the Prefect flow
runs the pipeline it sets ``GRAFT_PARENT_RUN_ID`` and the run nests under the flow's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

DEFAULT_EXPERIMENT = "graft"
PARENT_RUN_ENV = "GRAFT_PARENT_RUN_ID"
FLOW_RUN_ENV = "GRAFT_FLOW_RUN_ID"  # set by the Prefect flow for the stages it runs
RUN_FILE = "mlflow_run.json"  # written next to the fine-tuned model: the run to log into


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


def configure(root: Path | None = None) -> str:
    """Point MLflow at the project's store (unless ``MLFLOW_TRACKING_URI`` is set) and make
    sure the experiment exists; return its id. Call from ``main()``, never at import."""
    import mlflow

    root = (root or Path.cwd()).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (root / "mlruns" / "artifacts").as_uri() if uri.startswith("sqlite") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a concurrent process
        return client.get_experiment_by_name(name).experiment_id


def git_info(root: Path | None = None) -> dict[str, str]:
    root = root or Path.cwd()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def data_version(lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """The ``dvc.lock`` hashes of the data the model saw: the source (ingest's deps) and
    each data stage's output directory. ``data_version`` is the prepared arrays' hash,
    the one ``dvc checkout`` restores."""
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    out: dict[str, str] = {}
    stages = lock.get("stages", {})
    for dep in stages.get("ingest", {}).get("deps", []):
        if not dep["path"].startswith("stages/"):
            out["data.source"] = f"{dep['path']}@{dep.get('md5', '?')}"
    for stage in ("ingest", "preprocess"):
        for o in stages.get(stage, {}).get("outs", []):
            if str(o.get("md5", "")).endswith(".dir"):  # data directories, not metrics files
                out[f"data.{o['path']}"] = o["md5"]
                if stage == "preprocess":
                    out["data_version"] = o["md5"]
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def run_tags(root: Path | None = None) -> dict[str, str]:
    tags = {**git_info(root), **data_version((root or Path.cwd()) / "dvc.lock")}
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags
