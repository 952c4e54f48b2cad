"""Deployments of graft's flows: the cron schedules from graft.yaml, served in-process
(``graft serve``) or run by Prefect workers of a work pool on other machines.

A work-pool deployment carries no path of this machine: its pull steps (Prefect's own
``git_clone``, then ``graft pull --install`` in the clone) give whichever worker picks a
run up a clean working copy of the pushed code, its missing dependencies and the DVC
data the remote holds; the run logs to the MLflow tracking server (artifacts through
the server) and pushes its outputs to the DVC remote.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from flows.services import project_tag
from graft.base.errors import GraftError
from graft.config import project
from graft.config.project import ScheduleConfig, SensorConfig, VerifyConfig, WorkersConfig

TRAINING_ENTRYPOINT = "flows/training.py:training_pipeline"  # relative to the repository root


def workers_config(root: Path) -> WorkersConfig:
    return project.load(root).workers


def schedule_config(root: Path) -> tuple[ScheduleConfig, SensorConfig]:
    cfg = project.load(root)
    return cfg.schedule, cfg.sensor


def verify_config(root: Path) -> VerifyConfig:
    return project.load(root).verify


def deployment_names(root: Path) -> tuple[str, str]:
    """Per-project names, so several projects can share one Prefect server."""
    return f"{root.name}-retrain", f"{root.name}-sensor"


def deployments(root: Path, sensor: bool = True, verify: bool = False):
    """The RunnerDeployments (training on ``schedule.cron``, the sensor on ``sensor.cron``,
    the champion's reproduction on ``verify.cron``).
    ``concurrency_limit=1`` makes Prefect itself queue a second run of the same deployment."""
    from prefect.schedules import Cron  # Prefect: ~1.4 s of import, paid by the commands that use it

    from flows.sensor import data_sensor  # the flow module: Prefect comes with it, paid only here
    from flows.training import training_pipeline  # the flow module: Prefect comes with it, paid only here

    root = root.resolve()
    sched, sens = schedule_config(root)
    train_name, sensor_name = deployment_names(root)
    out = [
        training_pipeline.to_deployment(
            name=train_name,
            schedule=Cron(sched.cron, timezone=sched.timezone),
            parameters={"project_dir": str(root), "overrides": list(sched.overrides), "concurrency": sched.concurrency},
            concurrency_limit=1,
            description=f"Retrain graft project {root} on a schedule",
            tags=["graft", project_tag(root)],
        )
    ]
    if sensor:
        out.append(
            data_sensor.to_deployment(
                name=sensor_name,
                schedule=Cron(sens.cron, timezone=sched.timezone),
                parameters={"project_dir": str(root), "concurrency": sched.concurrency, "trigger": sens.trigger},
                concurrency_limit=1,
                description=f"Retrain graft project {root} when its data source changes"
                + (" and drifts from the champion's" if sens.trigger == "drift" else ""),
                tags=["graft", project_tag(root)],
            )
        )
    if verify:
        from flows.verify import verify_champion  # the flow module: Prefect comes with it, paid only here

        out.append(
            verify_champion.to_deployment(
                name=f"{root.name}-verify",
                schedule=Cron(verify_config(root).cron, timezone=sched.timezone),
                parameters={"project_dir": str(root)},
                concurrency_limit=1,
                description=f"Reproduce the champion of graft project {root}; notify when it no longer reproduces",
                tags=["graft", project_tag(root)],
            )
        )
    return out


@dataclass(frozen=True)
class Checkout:
    """The code a worker runs: a git repository URL and a branch or a commit."""

    repository: str
    branch: str | None = None
    commit: str | None = None

    def __str__(self) -> str:
        return f"{self.repository} at {'commit ' + self.commit if self.commit else 'branch ' + str(self.branch)}"


def _git(root: Path, *args: str) -> str:

    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GraftError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def checkout_for(root: Path, repository: str | None = None, branch: str | None = None,
                 commit: str | None = None) -> Checkout:  # fmt: skip
    """What workers clone: ``repository`` (default: this copy's ``origin``) at ``commit``,
    or at ``branch`` (default: the current branch). The branch or commit must already be
    on that repository: a worker sees only what was pushed."""
    if repository is None:
        try:
            repository = _git(root, "remote", "get-url", "origin")
        except GraftError:
            raise GraftError("workers clone the code from a git repository they can reach: this copy has no `origin`; "
                             "push it to one (`git remote add origin URL && git push -u origin HEAD`) or pass --repo URL") from None  # fmt: skip
    if commit is None and branch is None:
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
        if branch == "HEAD":
            raise GraftError("this copy is on a detached HEAD: pass --branch NAME or --commit SHA for the workers")
    ref = commit or branch
    if commit is None:
        if not _git(root, "ls-remote", "--heads", repository, str(branch)):
            raise GraftError(f"branch {branch!r} is not on {repository}: push it first (`git push origin {branch}`), "
                             "workers clone only what the repository has")  # fmt: skip
    else:
        advertised = _git(root, "ls-remote", repository)
        if commit not in advertised and not _git_has_commit(root, repository, commit):
            raise GraftError(f"commit {ref} is not on {repository}: push it first")
    return Checkout(repository, branch, commit)


def _git_has_commit(root: Path, repository: str, commit: str) -> bool:
    """Whether ``repository`` has ``commit`` (not only branch tips): fetched without checkout."""

    proc = subprocess.run(["git", "fetch", "--quiet", "--depth=1", repository, commit], cwd=root, capture_output=True)
    return proc.returncode == 0


def pull_steps(checkout: Checkout) -> list[dict]:
    """Prefect pull steps: clone the code, then (in the clone) install what the worker's
    environment lacks and pull the DVC data the remote holds. The flow run then starts in
    the clone (Prefect changes to the directory the steps return)."""
    clone: dict = {"id": "clone", "repository": checkout.repository}
    if checkout.commit:
        clone["commit_sha"] = checkout.commit
    else:
        clone["branch"] = checkout.branch
    return [
        {"prefect.deployments.steps.git_clone": clone},
        {"prefect.deployments.steps.run_shell_script": {
            # `python` of the worker's environment (start the worker from graft's venv);
            # -m runs the clone's own code, not the one installed with the worker.
            "script": "python -m flows.cli pull --install --project .",
            "directory": "{{ clone.directory }}",
            "stream_output": True,
        }},
    ]  # fmt: skip


def _with_steps(checkout: Checkout):
    """Prefect's GitRepository storage, with graft's preparation step after the clone."""
    from prefect.runner.storage import GitRepository  # Prefect: ~1.4 s of import, paid by the commands that use it

    class GraftCheckout(GitRepository):
        def to_pull_step(self):  # what RunnerDeployment.apply writes as the pull steps
            return pull_steps(checkout)

    return GraftCheckout(url=checkout.repository, branch=checkout.branch, commit_sha=checkout.commit)


def pool_deployment(root: Path, pool: str, checkout: Checkout, tracking_uri: str):
    """The retraining deployment for workers of ``pool``: clone, prepare, run the flow in
    the clone with the schedule's overrides, log to ``tracking_uri`` (a server: a worker
    cannot reach this machine's files)."""
    from prefect.schedules import Cron  # Prefect: ~1.4 s of import, paid by the commands that use it

    from flows.training import training_pipeline  # the flow module: Prefect comes with it, paid only here

    if not tracking_uri.startswith(("http://", "https://")):
        raise GraftError("a worker on another machine cannot write to this copy's MLflow store "
                         f"({tracking_uri}): start the tracking server (`graft server start`) or set "
                         "MLFLOW_TRACKING_URI to one the workers can reach")  # fmt: skip
    sched, _ = schedule_config(root)
    train_name, _ = deployment_names(root)
    d = training_pipeline.to_deployment(
        name=train_name,
        schedule=Cron(sched.cron, timezone=sched.timezone),
        parameters={"project_dir": ".", "overrides": list(sched.overrides), "concurrency": sched.concurrency},
        concurrency_limit=1,
        description=f"Retrain graft project {root.name} from {checkout}, on workers of pool {pool!r}",
        tags=["graft", "worker", project_tag(root)],
        job_variables={"env": {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "DVC_NO_ANALYTICS": "1",
            # A run whose machine dies stops sending these; the server then marks it Crashed.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(workers_config(root).heartbeat_seconds),
        }},
    )  # fmt: skip
    d.storage = _with_steps(checkout)
    d.entrypoint = TRAINING_ENTRYPOINT
    return d


def ensure_pool(pool: str) -> bool:
    """Create the work pool (process workers) unless it exists; True when created."""
    from prefect import get_client  # Prefect: ~1.4 s of import, paid by the commands that use it
    from prefect.client.schemas.actions import WorkPoolCreate  # Prefect: imported where used
    from prefect.exceptions import ObjectNotFound  # Prefect: ~1.4 s of import, paid by the commands that use it

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True


CRASH_AUTOMATION = "graft: mark flow runs Crashed when their heartbeats stop"


def ensure_crash_detection(root: Path) -> None:
    """A Prefect automation that marks a flow run Crashed when it stops sending heartbeats
    (its worker or machine died), instead of leaving it Running forever and its
    deployment's concurrency slot taken: Prefect's own recipe for runs whose process
    cannot report its own end. One per server; recreated when graft.yaml's grace changes."""

    from prefect import get_client  # Prefect: ~1.4 s of import, paid by the commands that use it
    from prefect.automations import Automation  # Prefect: ~1.4 s of import, paid by the commands that use it
    from prefect.client.schemas.objects import StateType  # Prefect: ~1.4 s of import, paid by the commands that use it
    from prefect.events.actions import ChangeFlowRunState  # Prefect: ~1.4 s of import, paid by the commands that use it
    from prefect.events.schemas.automations import EventTrigger, Posture  # Prefect: imported where used

    grace = workers_config(root).crashed_after_seconds
    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(CRASH_AUTOMATION):
            if getattr(existing.trigger, "within", None) == timedelta(seconds=grace):
                return
            client.delete_automation(existing.id)
    Automation(
        name=CRASH_AUTOMATION,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},  # fmt: skip
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=grace),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {grace} s: its worker or machine died")],  # fmt: skip
    ).create()
