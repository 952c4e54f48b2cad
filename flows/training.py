"""The Prefect flow over the DVC pipeline.

DVC owns the graph: the flow reads the stage order from DVC's Python API
(``Repo.index.graph``) and runs each stage through DVC (``dvc repro --single-item``),
so DVC's cache decides what is stale and ``dvc.lock`` stays the record. Prefect adds one
task per stage with retries and timeouts from ``graft.yaml``, the stage's output in the
run log, run history, and a parent MLflow run that the pipeline's run nests under.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.states import Completed, Failed, State

from flows import remote
from flows.fingerprint import fingerprint, record_accepted
from flows.notify import notify
from flows.pipeline import ProjectLock, StageFailed, plan, read_summary, stale_stages, summary_markdown
from flows.services import kill_group
from graft.base import fsio
from graft.base.errors import STATUS_ENV, GraftError
from graft.config.params import read_params
from graft.config.project import stage_options
from graft.overrides import apply_overrides, check_inputs, write_overrides
from graft.tracking import runs as tracking

# Lines of DVC's console output that speak to someone running `dvc repro` by hand; the
# flow runs each stage on its own, so once per stage they are noise (the summary at the
# end says what to do next).
DVC_HINTS = ("Use `dvc push`", "To track the changes with git", "To enable auto staging", "dvc config core.autostage",
             "git add ")  # fmt: skip
STATUS_DIR = Path(".graft") / "stages"  # where each stage writes how it ended (STATUS_ENV)
REGISTER_STAGE = "register"  # the stage that creates model versions
PIPELINE_ARTIFACTS = "pipeline"  # the flow's MLflow run keeps dvc.lock and params.yaml here


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a failed task with ``exc_info=True`` even when the failure is a
    returned state, not an exception, which prints a bare ``NoneType: None``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


def _quiet_task_failures() -> None:
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoEmptyTraceback) for f in logger.filters):
        logger.addFilter(_NoEmptyTraceback())


def _retry_condition(task_, task_run, state) -> bool:
    exc = getattr(state, "data", None)
    return not (isinstance(exc, StageFailed) and not exc.retryable)


@task(retry_condition_fn=_retry_condition)
def run_stage(root: str, stage: str, env: dict[str, str], from_remote: bool = False, planned: bool = True):
    """Run one DVC stage (``dvc repro --single-item``) if DVC finds it stale; its output
    goes to the Prefect log. Returns ``ran``, ``restored`` (DVC put the outputs back
    from its run-cache without running the stage's code), or a ``Cached`` state.
    ``from_remote``: the run-cache may also come from the DVC remote (``--pull``).
    ``planned=False``: DVC's status at the start of the run found neither the stage nor
    anything upstream of it changed, so it is Cached without asking DVC again (each
    question opens the repository: 0.5 s a stage, most of a no-op run's time)."""
    logger = get_run_logger()
    if not planned or not stale_stages(Path(root), [stage]):
        return Completed(message=f"DVC: stage '{stage}' unchanged, skipped", name="Cached", data="cached")
    status_file = Path(root) / STATUS_DIR / f"{stage}.json"
    status_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--pull"] if from_remote else []), stage],
        cwd=root, env={**env, STATUS_ENV: str(status_file)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,  # its own process group: a timeout kills the stage too
    )  # fmt: skip
    lines: list[str] = []
    missing = remote.MissingOutputs()  # DVC's per-file warning, said once below
    # The output is read by a helper thread: Prefect's timeout reaches a task running in a
    # worker thread as an exception injected between bytecodes, which a read blocked on a
    # silent stage would never see. Waiting on the queue returns to Python every second.
    output: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            output.put(raw)
        output.put(None)

    threading.Thread(target=pump, name=f"dvc-{stage}-output", daemon=True).start()
    try:
        while True:
            try:
                raw = output.get(timeout=1.0)
            except queue.Empty:
                continue
            if raw is None:
                break
            line = raw.rstrip("\n").rsplit("\r", 1)[-1].rstrip()  # last redraw of a progress bar
            if line and not line.lstrip().startswith(DVC_HINTS) and not missing.swallow(line):
                lines.append(line)
                logger.info(line)
        code = proc.wait()
        if missing.summary(stage):
            logger.warning("%s", missing.summary(stage))
    except BaseException:  # timeout, cancellation, Ctrl-C: never leave the stage running

        kill_group(proc.pid, grace=10)
        proc.wait()
        raise

    status = fsio.read_json(status_file) if status_file.is_file() else None
    if code != 0 or (status and status["exit_code"] != 0):
        # The stage's own exit code and message when it got to run; DVC's otherwise (a
        # missing dependency, a lock held by another DVC process).
        exit_code = status["exit_code"] if status else code
        message = (status or {}).get("message") or "\n".join(lines[-25:])
        failure = StageFailed(stage, exit_code, message)
        logger.error("%s\n%s", failure.headline, message)  # the message, once
        return Failed(message=failure.headline, data=failure)
    return "ran" if status else "restored"


def _stage_env(root: Path, parent_run_id: str | None, flow_run_id: str | None) -> dict[str, str]:
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


def flow_run_name() -> str:
    """The Prefect flow run's name: the project and what the run changes (its ``--set``
    overrides), so the runs list reads as the project's history, not as random words."""
    from prefect.runtime import flow_run  # Prefect: ~1.4 s of import, paid by the commands that use it

    return name_for(flow_run.parameters or {})


def name_for(params: dict) -> str:
    project = Path(str(params.get("project_dir") or ".")).resolve().name
    overrides = params.get("overrides") or []
    return f"{project}: " + (" ".join(f"--set {o}" for o in overrides) if overrides else "run")


def mlflow_run_name(root: Path, planned: list[str], order: list[str]) -> str:
    """The MLflow parent run's name: the project and the stages this run reruns."""
    what = "every stage" if planned == order else f"from {planned[0]}" if len(planned) > 1 else planned[0]
    return f"{root.name}: {what}"


@flow(name="graft-training", log_prints=True, flow_run_name=flow_run_name)
def training_pipeline(project_dir: str = ".", overrides: list[str] | None = None,
                      concurrency: Literal["wait", "skip"] = "wait", wait_timeout: float | None = None):  # fmt: skip
    """Run graft's DVC pipeline, one Prefect task per stage, and return a summary: which
    stages ran or were cached, the test metrics and the promotion decision.

    Only one run at a time trains in a project: a second run waits for the first
    (``concurrency="wait"``) or returns at once with ``skipped`` (``"skip"``). A stage
    that fails ends the flow Failed, with the ``StageFailed`` (or, for a source that is
    missing before anything runs, the ``GraftError``) as the state's data."""
    from prefect.runtime import flow_run  # Prefect: ~1.4 s of import, paid by the commands that use it

    logger = get_run_logger()
    _quiet_task_failures()
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
        # Checked with the overrides applied, before they are written: a refused --set leaves params.yaml as it was.
        check_inputs(apply_overrides(read_params(root / "params.yaml"), overrides or []), root)
        _write_overrides(root, overrides or [], logger)
        source = fingerprint(root)  # taken before the stages: a change during them is not missed
        summary = _run_pipeline(root, flow_run_id, logger)
        record_accepted(root, source)
        # After the registry is settled: a failed push is reported, never fails the run.
        summary["remote"] = remote.push(root, logger, run_id=flow_run_id)
    except (StageFailed, GraftError) as e:
        # Bad input or a failed stage: its message was logged once; the flow ends Failed
        # without a traceback, carrying the exception for callers.
        stage = getattr(e, "stage", None)
        notify(root, "run_failed", {"flow_run_id": flow_run_id, "flow_run_name": flow_run.name, "stage": stage,
                                    "error": str(e)[-2000:]}, logger)  # fmt: skip
        _publish_artifact(root, None, e)
        if isinstance(e, GraftError):
            logger.error("%s", e)
        return Failed(message=e.headline if isinstance(e, StageFailed) else str(e).splitlines()[0], data=e)
    except BaseException as e:
        notify(root, "run_failed", {"flow_run_id": flow_run_id, "flow_run_name": flow_run.name,
                                    "error": f"{type(e).__name__}: {e}"[-2000:]}, logger)  # fmt: skip
        raise
    finally:
        lock.release()
    decision = summary.get("decision") or {}
    if summary["stages"].get("register") == "ran" and decision.get("alias") == "champion" and not decision.get("same_as"):
        notify(root, "promoted", {"flow_run_id": flow_run_id, "flow_run_name": flow_run.name,
                                  "model_name": decision.get("model_name"), "version": decision.get("version"),
                                  "reason": decision.get("reason"), "metrics": summary.get("metrics")}, logger)  # fmt: skip
    _publish_artifact(root, summary, None)
    return summary


def _write_overrides(root: Path, overrides: list[str], logger) -> None:
    """Like `dvc exp run -S`: overrides are checked, then written to params.yaml, so
    dvc.lock and the MLflow run record exactly what was used."""
    if not overrides:
        return

    write_overrides(root / "params.yaml", overrides)
    logger.info("params.yaml updated: %s", ", ".join(overrides))


def _run_pipeline(root: Path, flow_run_id: str | None, logger) -> dict[str, Any]:

    graph, stale = plan(root)
    # Outputs missing here but recorded in dvc.lock (a fresh clone, a clean worker): the
    # DVC remote may hold them, and restoring beats recomputing.
    pulled = remote.pull(root, stale, logger) if stale else []
    stale = [s for s in stale if s not in pulled]  # pull() has just asked DVC about each of them
    # Stages still stale may have run elsewhere (a worker's run, whose dvc.lock stayed
    # there): with the remote's run-cache, DVC restores them instead of running them.
    from_remote = remote.pull_run_cache(root, logger) if stale else False
    # Of those, the ones whose dvc.lock names outputs that exist nowhere (a lock committed
    # from another machine): DVC would take the lock's entry and retrain; the run-cache has them.
    past_lock = remote.restore_past_the_lock(root, stale, from_remote, logger) if stale else []
    stale = [s for s in stale if s not in past_lock]
    planned = graph.downstream_of(set(stale))
    parent_id = None
    client = None
    if planned:
        import mlflow  # only when something runs: its import is a second of a no-op run

        experiment_id = tracking.configure(root)
        client = mlflow.MlflowClient()
        tags = {**tracking.run_tags(root, data=False), "graft.kind": "flow", "mlflow.runName": mlflow_run_name(root, planned, graph.order),
                **({"prefect_flow_run_id": flow_run_id} if flow_run_id else {})}  # fmt: skip
        for orphan in tracking.end_orphans(client, experiment_id, root):
            logger.warning("MLflow run %s of an interrupted earlier run was still RUNNING: marked FAILED", orphan)
        for orphan in end_runs_of_ended_flows(client, experiment_id, flow_run_id):
            logger.warning("MLflow run %s belongs to a flow run that ended without closing it (its worker died): "
                           "marked FAILED", orphan)  # fmt: skip
        parent_id = client.create_run(experiment_id, tags=tags).info.run_id
        logger.info("stages to run: %s (changed in DVC's view, and what depends on them); MLflow parent run %s",
                    ", ".join(planned), parent_id)  # fmt: skip
    else:
        logger.info("DVC: every stage is up to date; nothing to run")

    env = _stage_env(root, parent_id, flow_run_id)
    results: dict[str, str] = {}
    states: dict[str, State] = {}
    try:
        for stage in graph.order:
            opts = stage_options(root, stage)
            runner = run_stage.with_options(
                name=f"dvc-{stage}", retries=opts.retries, retry_delay_seconds=opts.retry_delay_seconds,
                timeout_seconds=opts.timeout_seconds,
            )  # fmt: skip
            if stage == REGISTER_STAGE and stage in planned and remote.default_remote(root) is not None:
                # What the new version will reference goes to the remote before it exists;
                # a failed push is queued and retried by every later push.
                remote.push(root, logger, run_id=flow_run_id)
            # wait_for: the upstream stages' states, so Prefect's run graph is DVC's graph.
            state = runner(str(root), stage, env, from_remote, stage in planned,
                           wait_for=[states[u] for u in graph.upstream[stage]], return_state=True)  # fmt: skip
            states[stage] = state
            if not state.is_completed():
                failure = state.data if isinstance(state.data, StageFailed) else None
                if failure is None and state.name == "TimedOut":  # run_stage killed the stage's process group
                    failure = StageFailed(stage, 1, f"stopped after {opts.timeout_seconds:g} s, its processes with it "
                                                    f"(graft.yaml: stages.{stage}.timeout_seconds)")  # fmt: skip
                    logger.error("%s: %s", failure.headline, failure.message)
                if failure is None:  # a crash of the task itself
                    state.result()  # raises it
                raise failure
            results[stage] = state.result()
            if results[stage] == "cached" and stage in pulled:
                results[stage] = "pulled"
            elif results[stage] == "cached" and stage in past_lock:
                results[stage] = "restored"
    except BaseException:
        if client and parent_id:
            try:
                client.set_terminated(parent_id, "FAILED")
            except Exception as e:  # the tracking server itself is gone: the next run ends it
                logger.warning("could not mark MLflow run %s FAILED (%s); the next run will", parent_id,
                               tracking.unreachable_message(e) or e)  # fmt: skip
        raise
    summary = read_summary(root, results)
    summary["flow_run_id"] = flow_run_id
    summary["mlflow_parent_run_id"] = parent_id
    summary["tracking_uri"] = mlflow.get_tracking_uri() if client else None  # mlflow: imported above when client is set
    if client and parent_id:
        metrics = summary.get("metrics") or {}
        for k in ("accuracy", "macro_f1", "ece"):
            if k in metrics:
                client.log_metric(parent_id, f"test_{k}", float(metrics[k]))
        # The run's complete DVC record: with it, any clone can fetch this run's exact data
        # and model from the DVC remote (`graft pull --version`), even when this copy's
        # dvc.lock never reaches git (a worker's clean checkout).
        client.log_artifact(parent_id, str(root / "dvc.lock"), PIPELINE_ARTIFACTS)
        client.log_artifact(parent_id, str(root / "params.yaml"), PIPELINE_ARTIFACTS)
        client.set_terminated(parent_id, "FINISHED")
    return summary


def end_runs_of_ended_flows(client, experiment_id: str, current: str | None) -> list[str]:
    """Mark FAILED the MLflow runs still RUNNING whose Prefect flow run has ended: a worker
    that died mid-run (its flow run marked Crashed by the server) left them open, in a
    checkout on another machine that no later run will see (so the per-project check in
    ``tracking.end_orphans`` cannot find them)."""

    from prefect import get_client  # Prefect: ~1.4 s of import, paid by the commands that use it

    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    ids = {r.data.tags.get("prefect_flow_run_id") for r in runs} - {None, current}
    if not ids:
        return []
    ended = set()
    with get_client(sync_client=True) as prefect:
        for fid in ids:
            try:
                state = prefect.read_flow_run(UUID(fid)).state
            except Exception:  # a run of another Prefect server (a local `graft run`): not ours to judge
                continue
            if state is not None and state.is_final():
                ended.add(fid)
    out = []
    for r in runs:
        if r.data.tags.get("prefect_flow_run_id") in ended:
            client.set_tag(r.info.run_id, "graft.ended_by", "a later run: its Prefect flow run had ended (crashed)")
            client.set_terminated(r.info.run_id, "FAILED")
            out.append(r.info.run_id)
    return out


def _publish_artifact(root: Path, summary: dict[str, Any] | None, error: BaseException | None) -> None:
    from prefect.artifacts import create_markdown_artifact  # Prefect: imported where used

    create_markdown_artifact(markdown=summary_markdown(summary, error), key="graft-run-summary",
                             description=f"graft run of {root}")  # fmt: skip
