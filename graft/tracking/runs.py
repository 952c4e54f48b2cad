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
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from graft.base import fsio, secrets
from graft.base.secrets import mask_url
from graft.config.params import read_params

DEFAULT_EXPERIMENT = "graft"
PARENT_RUN_ENV = "GRAFT_PARENT_RUN_ID"
FLOW_RUN_ENV = "GRAFT_FLOW_RUN_ID"  # set by the Prefect flow for the stages it runs
RUN_FILE = "mlflow_run.json"  # written next to the fine-tuned model: the run to log into
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# MLflow 3's UI opens an experiment without this tag on its GenAI traces view ("Traces 0");
# with it, on the runs table. "custom_model_development" is its "Machine learning" kind.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# The page a person opens: the experiment's runs table. MLflow 3's UI opens on its GenAI
# overview unless the URL asks for the model-training view (measured in Chromium: the tag
# above alone did not change the landing page).
RUNS_PAGE = "#/experiments/{experiment_id}?workflowType=machine_learning"


def runs_page(ui: str, experiment_id: str) -> str:
    """The URL of graft's experiment's runs table on the MLflow UI at ``ui``."""
    return ui.rstrip("/") + "/" + RUNS_PAGE.format(experiment_id=experiment_id)


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


# MLflow retries an unanswered request for about 4 minutes by default (7 retries, backoff
# factor 2), and a stage makes dozens of requests: a dead tracking server hung runs for a
# quarter of an hour. graft's defaults give up after about 15 s per request; MLflow's own
# variables, when set, win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}  # fmt: skip
PROJECT_TAG = "graft.project"  # the project directory a run belongs to


def configure(root: Path | None = None) -> str:
    """Point MLflow at the project's store (unless ``MLFLOW_TRACKING_URI`` is set) and make
    sure the experiment exists; return its id. Call from ``main()``, never at import."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    root = (root or Path.cwd()).resolve()
    # A server that asks for credentials gets this machine's (environment first, then the
    # git-ignored secrets file), for a stage run by plain `dvc repro` as for the flow.
    creds = secrets.resolved(root)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        if key in creds:
            os.environ.setdefault(key, creds[key])
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        experiment_id = exp.experiment_id
        if KIND_TAG not in exp.tags:  # one made before graft marked it; a kind the user chose stays
            client.set_experiment_tag(experiment_id, KIND_TAG, KIND)
    else:
        # A local store keeps artifacts beside it in mlruns/artifacts; a tracking server
        # decides for itself (its proxied artifact store).
        location = (root / "mlruns" / "artifacts").as_uri() if uri.startswith("sqlite") else None
        try:
            experiment_id = client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
        except Exception:  # created meanwhile by a concurrent process
            created = client.get_experiment_by_name(name)
            assert created is not None, name
            experiment_id = created.experiment_id
    # The fluent API (mlflow.start_run) would otherwise log into experiment 0, "Default".
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def host_creds(client=None):
    """MLflow's request credentials for the tracking server (``client``'s, or the current
    one); None for a local store."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read
    from mlflow.utils.credentials import get_default_host_creds  # MLflow: imported where used

    uri = client.tracking_uri if client is not None else mlflow.get_tracking_uri()
    if not str(uri).startswith(("http://", "https://")):
        return None
    return get_default_host_creds(uri)


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


def log_params_file(params_path: Path) -> None:
    """All of params.yaml as the active run's params (flat ``section.key``; MLflow caps a
    value at 500 characters)."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    # A source URL may carry a password (https://user:password@host/...): never into the store.
    mlflow.log_params({k: mask_url(str(v))[:500] for k, v in flatten(read_params(params_path)).items()})


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
    root = (root or Path.cwd()).resolve()
    tags = {**git_info(root), **(data_version(root / "dvc.lock") if data else {}), PROJECT_TAG: str(root),
            PROCESS_TAG: this_process()}  # fmt: skip
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    if os.environ.get(REPRODUCTION_ENV):
        tags[REPRODUCTION_TAG] = os.environ[REPRODUCTION_ENV]
    return {k: mask_url(v) for k, v in tags.items()}


def log_datasets(prepared: Path, contexts: dict[str, str], lock_path: Path = Path("dvc.lock")) -> None:
    """Record the prepared splits as MLflow datasets of the active run (the run page's
    "Datasets"): one per split, its rows (sample id and class), the ingest source, and the
    prepared data's DVC hash as the digest, so "trained on what?" has an answer in the UI
    that matches ``dvc.lock``. ``contexts`` maps a split to MLflow's context (training...)."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read
    import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

    version = data_version(lock_path)
    digest = version.get("data_version", "").removesuffix(".dir") or None
    source = mask_url(version.get("data.source", "").rsplit("@", 1)[0]) or str(prepared.resolve())
    classes = np.asarray(fsio.read_json(prepared / "meta.json")["classes"])
    for split, context in contexts.items():
        frame = pd.DataFrame({"id": np.load(prepared / f"{split}_ids.npy"),
                              "class_name": classes[np.load(prepared / f"{split}_y.npy")]})  # fmt: skip
        with warnings.catch_warnings():
            # MLflow registers its local-path source class twice and then warns that a path
            # "can be interpreted in multiple ways" (both are the same class).
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
            dataset = mlflow.data.from_pandas(  # type: ignore[attr-defined]  # exported lazily
                frame, source=source, name=split, digest=digest, targets="class_name")
        mlflow.log_input(dataset, context=context, tags={"dvc_hash": version.get("data_version", "unknown")})


def unreachable_message(exc: BaseException) -> str | None:
    """A message for a person when ``exc`` means the tracking server did not answer (None
    otherwise): where it was, and the two ways out."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    signs = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection", "Read timed out",
             "Connection aborted", "RemoteDisconnected")  # fmt: skip
    for e in _causes(exc):
        if any(sign in str(e) for sign in signs):
            return (f"tracking server at {mask_url(uri)} unreachable: start it with `graft server start` or unset "
                    "MLFLOW_TRACKING_URI (training keeps its checkpoint: the rerun resumes and logs what was missed)")
    return None


def _causes(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during, innermost last (each once)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def refused_message(exc: BaseException) -> str | None:
    """A message for a person when ``exc`` means the tracking server refused the request
    (wrong or missing credentials, or a permission the user lacks); None otherwise.
    Retrying does not help: the answer is a login or a grant."""
    uri = mask_url(os.environ.get("MLFLOW_TRACKING_URI", "") or "?")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    for e in _causes(exc):
        text = str(e)
        if "error code 401" in text or "You are not authenticated" in text:
            who = f"the password of MLflow user {user}" if user else "a request without credentials"
            return (f"the tracking server at {uri} refused {who}: set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD in the environment or .graft/secrets.yaml (an admin creates users "
                    "with `graft server user add NAME`)")  # fmt: skip
        if "PERMISSION_DENIED" in text or "error code 403" in text:
            return (f"the tracking server at {uri} does not allow MLflow user {user or '?'} to do this "
                    f"({text.strip().splitlines()[0][:200]}); running the pipeline needs EDIT on the experiment and "
                    f"the registered model: an admin grants it with `graft server user grant {user or 'NAME'} "
                    "--permission EDIT`")  # fmt: skip
    return None


PROCESS_TAG = "graft.process"  # "host pid start-time" of the process that holds the run open


def this_process() -> str:
    return f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time():.2f}"


def _alive(process: str | None) -> bool | None:
    """Whether the process a run's ``graft.process`` tag names is still running: None when
    that cannot be known here (no tag: a run from before it, or another machine's)."""
    try:
        host, pid, started = (process or "").split()
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started  # the pid, not a later process given it
    except psutil.Error:
        return False


def end_orphans(client, experiment_id: str, root: Path) -> list[str]:
    """Mark FAILED the runs of this project still RUNNING from a run that died (killed,
    or its tracking server went away before it could say so). Call only while this
    project's lock is held, so no graft run of it is alive. A run whose process is known
    and still alive (a plain ``dvc repro``, which takes no lock) is left alone; a training
    run resumed later comes back to RUNNING by itself."""
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{PROJECT_TAG}` = '{root}'")
    ended = []
    for run in runs:
        if _alive(run.data.tags.get(PROCESS_TAG)):
            continue
        client.set_tag(run.info.run_id, "graft.ended_by", "a later run of the project: this one was interrupted")
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    return ended


WEIGHTS_TAG = "fine_tuned_weights_sha256"  # on a training run: the sha256 of the weights it saved
REPRODUCTION_ENV = "GRAFT_REPRODUCTION_OF"  # set by `graft reproduce`: NAME/VERSION being reproduced
REPRODUCTION_TAG = "graft.reproduction_of"
LINEAGE_DIR = "lineage"  # a training run's artifacts that rebuild its inputs: params.yaml, dvc.lock, git.diff


def log_lineage(params_path: Path, root: Path | None = None) -> list[str]:
    """Log into the active run what rebuilds this training's inputs whatever the commit's
    state: params.yaml as used, dvc.lock as it stands when training starts (the hashes of
    the data snapshot, the prepared data and the pretrained model), and, when tracked files
    have uncommitted changes, their ``git diff HEAD``. Return the untracked source files
    the stages may import (a warning: no diff carries them)."""

    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    root = (root or Path.cwd()).resolve()
    mlflow.log_artifact(str(params_path), LINEAGE_DIR)
    if (root / "dvc.lock").is_file():
        mlflow.log_artifact(str(root / "dvc.lock"), LINEAGE_DIR)
    untracked: list[str] = []
    try:
        diff = subprocess.run(["git", "diff", "--binary", "HEAD", "--", ".", ":(exclude)dvc.lock"], cwd=root,
                              capture_output=True, check=True).stdout  # fmt: skip
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "graft", "stages", "flows"], cwd=root,
                                   capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    except (subprocess.CalledProcessError, FileNotFoundError):
        return untracked
    if diff:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "git.diff").write_bytes(diff)
            mlflow.log_artifact(str(Path(tmp) / "git.diff"), LINEAGE_DIR)
    untracked = [f for f in untracked if f.endswith(".py")]
    if untracked:
        print(f"warning: untracked source files that the stages may import: {', '.join(untracked)}; no commit or diff "
              "carries them, so `graft reproduce` cannot rebuild this run: `git add` them")  # fmt: skip
    return untracked


REGISTERED_TAG = "graft.registered_version"  # set on a run once a model version was registered from it


def run_for(stage: str, run_id: str, params_path: Path) -> str:
    """The MLflow run that ``evaluate`` or ``register`` (``stage``) logs into.

    ``run_id`` itself when this pipeline run made it: under the Prefect flow, it is nested
    under this flow run's parent; with plain ``dvc repro``, this stage has not logged into
    it yet (no test metrics for evaluate, no registered version for register). Otherwise
    its model came from DVC's cache (an unchanged stage skipped, a later one rerun): a new
    run is opened, nested like the original would be, with this run's params and
    versions and ``graft.training_run_id`` linking the run that trained the model, so a
    new result never lands on an old run."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        current = run.data.tags.get("mlflow.parentRunId") == parent
    elif stage == "evaluate":
        current = "test_accuracy" not in run.data.metrics
    else:
        current = REGISTERED_TAG not in run.data.tags
    if current:
        return run_id
    training_run_id = run.data.tags.get("graft.training_run_id", run_id)
    nest: dict[str, Any] = {"nested": True, "parent_run_id": parent} if parent else {}
    with mlflow.start_run(run_name=f"{stage}-{run.info.run_name}", experiment_id=run.info.experiment_id, **nest) as new:
        log_params_file(params_path)
        mlflow.set_tags({**run_tags(), "graft.stage": stage, "graft.training_run_id": training_run_id,
                         "pretrained_weights_sha256": run.data.tags.get("pretrained_weights_sha256", "none"),
                         "mlflow.note.content": f"{stage} of the model trained in run {training_run_id}, restored "
                                                "from DVC's cache (not retrained by this pipeline run)."})  # fmt: skip
    print(f"{stage}: the model was trained by an earlier pipeline run ({training_run_id}); logging into a new "
          f"MLflow run {new.info.run_id} that links it")
    return new.info.run_id
