"""The Prefect flow over the DVC pipeline.

DVC owns the graph: the flow reads the stage order from DVC's Python API
(``Repo.index.graph``) and runs each stage through DVC (``dvc repro --single-item``),
so DVC's cache decides what is stale and ``dvc.lock`` stays the record. Prefect adds one
task per stage with retries and timeouts from ``graft.yaml``, the stage's output in the
run log, run history, and a parent MLflow run that the pipeline's run nests under.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Completed, State

from flows.config import stage_options
from stages.common import BAD_INPUT_EXIT

STAGE_EXIT = re.compile(r"exited with (-?\d+)")


class StageFailed(RuntimeError):
    """A DVC stage failed; ``retryable`` is False for bad input (exit code 2)."""

    def __init__(self, stage: str, exit_code: int | None, output: list[str]):
        self.stage, self.exit_code, self.output = stage, exit_code, output
        self.retryable = exit_code != BAD_INPUT_EXIT
        tail = "\n".join(output[-25:])
        super().__init__(f"stage '{stage}' failed (exit code {exit_code}):\n{tail}")


def stage_order(root: Path) -> list[str]:
    """The pipeline's stages in dependency order, from DVC's own graph."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [s.name for s in reversed(list(nx.topological_sort(repo.index.graph)))]


def stale_stages(root: Path) -> list[str]:
    """Stages DVC sees as changed now (upstream changes make more stale as they run)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted(repo.status())


def _retry_condition(task_, task_run, state) -> bool:
    exc = getattr(state, "data", None)
    return not (isinstance(exc, StageFailed) and not exc.retryable)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


@task(retry_condition_fn=_retry_condition)
def run_stage(root: str, stage: str, env: dict[str, str]):
    """``dvc repro --single-item <stage>``; its output goes to the Prefect log. Returns a
    ``Cached`` state when DVC found nothing to do."""
    logger = get_run_logger()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a timeout kills the stage too
    )  # fmt: skip
    lines: list[str] = []
    try:
        for raw in proc.stdout:  # type: ignore[union-attr]
            line = raw.rstrip("\n").rsplit("\r", 1)[-1].rstrip()  # last redraw of a progress bar
            if line:
                lines.append(line)
                logger.info(line)
        code = proc.wait()
    except BaseException:  # timeout, cancellation, Ctrl-C: never leave the stage running
        _kill_group(proc)
        raise
    if code != 0:
        codes = [int(m.group(1)) for line in lines if (m := STAGE_EXIT.search(line))]
        raise StageFailed(stage, codes[-1] if codes else code, lines)
    if any(line.startswith(f"Running stage '{stage}'") for line in lines):
        return "ran"
    return Completed(message=f"DVC: stage '{stage}' unchanged, skipped", name="Cached", data="cached")


def _stage_env(root: Path, parent_run_id: str | None, flow_run_id: str | None) -> dict[str, str]:
    from stages import tracking

    env = dict(os.environ)
    # dvc.yaml calls `python -m stages...`: this interpreter's environment must come first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("MLFLOW_TRACKING_URI", tracking.default_tracking_uri(root))
    if parent_run_id:
        env[tracking.PARENT_RUN_ENV] = parent_run_id
    if flow_run_id:
        env[tracking.FLOW_RUN_ENV] = flow_run_id
    return env


class ProjectLock:
    """One training run at a time per project: an exclusive ``flock`` on
    ``.graft/training.lock``. The kernel drops it when the holder dies, so a killed run
    never leaves the project locked."""

    def __init__(self, root: Path):
        self.path = root / ".graft" / "training.lock"
        self.fd: int | None = None

    def acquire(self, wait: bool, timeout: float | None = None, poll: float = 1.0) -> bool:
        import fcntl
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(self.fd, 0)
                os.write(self.fd, f"{os.getpid()}\n".encode())
                return True
            except BlockingIOError:
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    os.close(self.fd)
                    self.fd = None
                    return False
                time.sleep(poll)

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def read_summary(root: Path, stages: dict[str, str]) -> dict[str, Any]:
    from stages import fsio

    summary: dict[str, Any] = {"stages": stages}
    for key, rel in (("metrics", "reports/evaluate/metrics.json"), ("decision", "reports/register/decision.json")):
        path = root / rel
        summary[key] = fsio.read_json(path) if path.is_file() else None
    return summary


@flow(name="graft-training", log_prints=True)
def training_pipeline(project_dir: str = ".", overrides: list[str] | None = None,
                      concurrency: str = "wait", wait_timeout: float | None = None) -> dict[str, Any]:
    """Run graft's DVC pipeline, one Prefect task per stage, and return a summary: which
    stages ran or were cached, the test metrics and the promotion decision.

    Only one run at a time trains in a project: a second run waits for the first
    (``concurrency="wait"``) or returns at once with ``skipped`` (``"skip"``)."""
    from prefect.runtime import flow_run

    from flows import sensor
    from flows.notify import notify

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    lock = ProjectLock(root)
    if not lock.acquire(wait=False):
        if concurrency == "skip":
            logger.warning("another training run (pid %s) holds %s: skipping this run", lock.holder(), lock.path)
            return {"skipped": True, "reason": f"another training run (pid {lock.holder()}) is in progress"}
        logger.warning("another training run (pid %s) holds %s: waiting for it to finish", lock.holder(), lock.path)
        if not lock.acquire(wait=True, timeout=wait_timeout):
            raise TimeoutError(f"gave up waiting for the training run holding {lock.path}")
    flow_run_id = str(flow_run.id) if flow_run.id else None
    try:
        _write_overrides(root, overrides or [], logger)
        source = sensor.fingerprint(root)  # taken before the stages: a change during them is not missed
        summary = _run_pipeline(root, flow_run_id, logger)
        sensor.record_accepted(root, source)
    except BaseException as e:
        stage = getattr(e, "stage", None)
        notify(root, "run_failed", {"flow_run_id": flow_run_id, "flow_run_name": flow_run.name, "stage": stage,
                                    "error": str(e)[-2000:]}, logger)  # fmt: skip
        raise
    finally:
        lock.release()
    decision = summary.get("decision") or {}
    if summary["stages"].get("register") == "ran" and decision.get("alias") == "champion":
        notify(root, "promoted", {"flow_run_id": flow_run_id, "flow_run_name": flow_run.name,
                                  "model_name": decision.get("model_name"), "version": decision.get("version"),
                                  "reason": decision.get("reason"), "metrics": summary.get("metrics")}, logger)  # fmt: skip
    return summary


def _write_overrides(root: Path, overrides: list[str], logger) -> None:
    """Like `dvc exp run -S`: overrides are checked, then written to params.yaml, so
    dvc.lock and the MLflow run record exactly what was used."""
    if not overrides:
        return
    from stages.config import write_overrides

    write_overrides(root / "params.yaml", overrides)
    logger.info("params.yaml updated: %s", ", ".join(overrides))


def _run_pipeline(root: Path, flow_run_id: str | None, logger) -> dict[str, Any]:
    import mlflow
    from prefect.runtime import flow_run

    from stages import tracking

    order = stage_order(root)
    stale = stale_stages(root)
    parent_id = None
    client = None
    if stale:
        tracking.configure(root)
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", tracking.DEFAULT_EXPERIMENT))
        tags = {**tracking.git_info(root), "graft.kind": "flow", "mlflow.runName": f"flow-{flow_run.name or 'local'}"}
        if flow_run_id:
            tags["prefect_flow_run_id"] = flow_run_id
        parent_id = client.create_run(experiment.experiment_id, tags=tags).info.run_id
        logger.info("stages to run (DVC status): %s; MLflow parent run %s", ", ".join(stale), parent_id)
    else:
        logger.info("DVC: every stage is up to date; nothing to run")

    env = _stage_env(root, parent_id, flow_run_id)
    results: dict[str, str] = {}
    try:
        for stage in order:
            opts = stage_options(root, stage)
            runner = run_stage.with_options(
                name=f"dvc-{stage}", retries=opts.retries, retry_delay_seconds=opts.retry_delay_seconds,
                timeout_seconds=opts.timeout_seconds,
            )  # fmt: skip
            outcome = runner(str(root), stage, env)
            # A task that returns a state (Cached) hands back the state itself.
            results[stage] = outcome.result() if isinstance(outcome, State) else outcome
    except BaseException:
        if client and parent_id:
            client.set_terminated(parent_id, "FAILED")
        raise
    summary = read_summary(root, results)
    summary["flow_run_id"] = flow_run_id
    summary["mlflow_parent_run_id"] = parent_id
    if client and parent_id:
        metrics = summary.get("metrics") or {}
        for k in ("accuracy", "macro_f1", "ece"):
            if k in metrics:
                client.log_metric(parent_id, f"test_{k}", float(metrics[k]))
        client.set_terminated(parent_id, "FINISHED")
    return summary
