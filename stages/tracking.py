"""MLflow tracking: where runs go, and what every run carries (params, data version,
code version).

The default store is a SQLite file plus an artifact folder under ``mlruns/`` in the
project (git-ignored); ``MLFLOW_TRACKING_URI`` overrides it, ``MLFLOW_EXPERIMENT_NAME``
picks the experiment (default ``graft``). A pipeline run is one MLflow run, started by
``fine_tune``; ``evaluate`` and ``register`` log into it by id. When the Prefect flow
runs the pipeline it sets ``GRAFT_PARENT_RUN_ID`` and the run nests under the flow's.
Every run, parent and nested, goes to the configured experiment (never MLflow's
"Default"): :func:`configure` makes it the active one and returns its id.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import yaml

DEFAULT_EXPERIMENT = "graft"
PARENT_RUN_ENV = "GRAFT_PARENT_RUN_ID"
FLOW_RUN_ENV = "GRAFT_FLOW_RUN_ID"  # set by the Prefect flow for the stages it runs
RUN_FILE = "mlflow_run.json"  # written next to the fine-tuned model: the run to log into
GIT_COMMIT_TAG = "mlflow.source.git.commit"


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
    name = experiment_name()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        experiment_id = exp.experiment_id
    else:
        # A local store keeps artifacts beside it in mlruns/artifacts; a tracking server
        # decides for itself (its proxied artifact store).
        location = (root / "mlruns" / "artifacts").as_uri() if uri.startswith("sqlite") else None
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent process
            experiment_id = client.get_experiment_by_name(name).experiment_id
    # The fluent API (mlflow.start_run) would otherwise log into experiment 0, "Default".
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def git_info(root: Path | None = None) -> dict[str, str]:
    """``mlflow.source.git.commit`` (MLflow's own tag for the code version) and
    ``git_dirty`` (whether tracked files other than ``dvc.lock`` had uncommitted changes)."""
    root = root or Path.cwd()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # dvc.lock is the pipeline's own record, rewritten by the very run being tagged.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {GIT_COMMIT_TAG: "unknown", "git_dirty": "unknown"}
    return {GIT_COMMIT_TAG: commit, "git_dirty": str(dirty).lower()}


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


def run_tags(root: Path | None = None, data: bool = True) -> dict[str, str]:
    """What every run carries: the code version, the data version (``data``), and the
    Prefect flow run that started it."""
    root = root or Path.cwd()
    tags = {**git_info(root), **(data_version(root / "dvc.lock") if data else {})}
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags


def log_datasets(prepared: Path, contexts: dict[str, str], lock_path: Path = Path("dvc.lock")) -> None:
    """Record the prepared splits as MLflow datasets of the active run (the run page's
    "Datasets"): one per split, its rows (sample id and class), the ingest source, and the
    prepared data's DVC hash as the digest, so "trained on what?" has an answer in the UI
    that matches ``dvc.lock``. ``contexts`` maps a split to MLflow's context (training...)."""
    import mlflow
    import numpy as np
    import pandas as pd

    from stages import fsio

    version = data_version(lock_path)
    digest = version.get("data_version", "").removesuffix(".dir") or None
    source = version.get("data.source", "").rsplit("@", 1)[0] or str(prepared.resolve())
    classes = np.asarray(fsio.read_json(prepared / "meta.json")["classes"])
    for split, context in contexts.items():
        frame = pd.DataFrame({"id": np.load(prepared / f"{split}_ids.npy"),
                              "class_name": classes[np.load(prepared / f"{split}_y.npy")]})  # fmt: skip
        with warnings.catch_warnings():
            # MLflow registers its local-path source class twice and then warns that a path
            # "can be interpreted in multiple ways" (both are the same class).
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=split, digest=digest, targets="class_name")
        mlflow.log_input(dataset, context=context, tags={"dvc_hash": version.get("data_version", "unknown")})
