"""The pipeline as DVC sees it, and what a run of it leaves, without Prefect.

Everything here is plain Python over DVC's API and the project's files, so that the
CLI (``graft status``, ``graft reproduce``) and the tests can use it without importing
Prefect, whose import alone costs about 1.5 s on 2 cores. ``flows/training.py`` builds
the Prefect flow on top of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from graft.base import fsio
from graft.base.errors import BAD_INPUT_EXIT
from graft.config import paths
from graft.tracking import runs as tracking


class StageFailed(RuntimeError):
    """A DVC stage failed. ``exit_code`` is the stage's own (2: bad input, never retried);
    ``message`` is what the stage said about it, for a person."""

    def __init__(self, stage: str, exit_code: int, message: str):
        self.stage, self.exit_code, self.message = stage, exit_code, message
        self.retryable = exit_code != BAD_INPUT_EXIT
        super().__init__(f"{self.headline}:\n{message}" if message else self.headline)

    def __repr__(self) -> str:  # Prefect logs a failed state with its data's repr: keep it one line
        return f"StageFailed(stage={self.stage!r}, exit_code={self.exit_code})"

    @property
    def headline(self) -> str:
        kind = "bad input" if not self.retryable else "error"
        return f"stage '{self.stage}' failed: {kind} (exit code {self.exit_code})"

    def advice(self) -> str:
        if not self.retryable:
            return "fix what the message names (the data source, or params.yaml), then run `graft run` again"
        return ("the stage crashed (its output is in the Prefect run log); rerun `graft run`: stages that "
                "finished are cached, and fine_tune resumes from its last checkpoint")  # fmt: skip


@dataclass(frozen=True)
class Pipeline:
    """DVC's stage graph: stages in dependency order and each one's direct upstream stages."""

    order: list[str]
    upstream: dict[str, list[str]]

    def downstream_of(self, stages: set[str]) -> list[str]:
        """``stages`` and every stage that depends on one of them, in order."""
        hit = set(stages)
        for s in self.order:
            if any(u in hit for u in self.upstream[s]):
                hit.add(s)
        return [s for s in self.order if s in hit]


def pipeline(root: Path) -> Pipeline:
    """The pipeline's graph, from DVC's own index (an edge points from a stage to a stage
    it depends on)."""
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    with Repo(str(root)) as repo:
        return _graph(repo)


def _graph(repo) -> Pipeline:
    import networkx as nx  # networkx: ~0.2 s of import, paid where the graph is walked

    graph = repo.index.graph
    order = [s.name for s in reversed(list(nx.topological_sort(graph)))]
    upstream = {s.name: sorted(d.name for d in graph.successors(s)) for s in graph.nodes}
    return Pipeline(order, upstream)


def plan(root: Path) -> tuple[Pipeline, list[str]]:
    """The graph and the stages DVC sees as changed, from one opening of the repository
    (each opening costs a few tenths of a second: a no-op run is mostly this)."""
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    with Repo(str(root)) as repo:
        return _graph(repo), sorted(key.rsplit(":", 1)[-1] for key in repo.status())


def stale_stages(root: Path, stages: list[str] | None = None) -> list[str]:
    """Stages DVC sees as changed now (running them makes their downstream stale too)."""
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    with Repo(str(root)) as repo:
        # Full addresses: a bare stage name would be looked up from this process's cwd.
        targets = [f"{root / 'dvc.yaml'}:{s}" for s in stages] if stages else None
        # Keys are addresses relative to the cwd too (`../p/dvc.yaml:validate`): keep the name.
        return sorted(key.rsplit(":", 1)[-1] for key in repo.status(targets=targets))


class ProjectLock:
    """One training run at a time per project: a ``filelock`` on ``.graft/training.lock``
    (an OS-level lock, which the kernel drops when the holder dies, so a killed run never
    leaves the project locked). The holder's pid goes to a file beside it, for messages."""

    def __init__(self, root: Path):

        self.path = root / ".graft" / "training.lock"
        self._pid_file = self.path.with_suffix(".pid")
        # thread_local=False: the lock may be released from another thread than the one
        # that took it (a timer in the tests, Prefect's worker threads).
        self._lock = FileLock(self.path, thread_local=False, is_singleton=False)

    def acquire(self, wait: bool, timeout: float | None = None, poll: float = 1.0) -> bool:

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=(-1 if timeout is None else timeout) if wait else 0, poll_interval=poll)
        except Timeout:
            return False
        self._pid_file.write_text(f"{os.getpid()}\n")
        return True

    def holder(self) -> str:
        try:
            return self._pid_file.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)


def read_summary(root: Path, stages: dict[str, str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"stages": stages}
    for key, rel in (("metrics", paths.METRICS), ("decision", paths.DECISION), ("run", paths.FINE_TUNED / tracking.RUN_FILE)):
        path = root / rel
        summary[key] = fsio.read_json(path) if path.is_file() else None
    return summary


def mlflow_run_link(tracking_uri: str | None, experiment_id: str, run_id: str) -> str:
    """Where a person opens the run: the tracking server's page, or the one `graft ui` serves."""
    base = tracking_uri if tracking_uri and tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def summary_markdown(summary: dict[str, Any] | None, error: BaseException | None) -> str:
    """The flow run's summary as Markdown, for the Prefect UI's Artifacts tab."""
    if error is not None:
        where = f"stage `{error.stage}`" if isinstance(error, StageFailed) else "before the pipeline started"
        advice = error.advice() if isinstance(error, StageFailed) else "fix what the message names, then run again"
        return f"# graft run: failed at {where}\n\n```\n{error}\n```\n\nWhat to do: {advice}.\n"
    assert summary is not None
    words = {"pulled": "restored from the remote", "restored": "restored from DVC's run-cache"}
    rows = "\n".join(f"| {s} | {words.get(r, r)} |" for s, r in summary["stages"].items())
    lines = ["# graft run: done", "", "| stage | outcome |", "|---|---|", rows, ""]
    m = summary.get("metrics")
    if m:
        lines += [f"Test accuracy **{m['accuracy']:.4f}**, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} "
                  f"on {m['n']} images.", ""]  # fmt: skip
    d = summary.get("decision")
    if d:
        lines += [f"Registry: `{d['model_name']}` v{d['version']} is **{d['alias']}**: {d['reason']}", ""]
    pushed = summary.get("remote")
    if pushed:
        lines += [f"DVC remote `{pushed['remote']}`: " + (pushed["message"] if pushed["ok"] else f"**push failed**: {pushed['message']}"), ""]
    run = summary.get("run")
    if run and run.get("experiment_id"):
        uri = summary.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "")
        served = uri.startswith("http")  # a tracking server shows it; a local store needs `graft ui`
        link = mlflow_run_link(uri, run["experiment_id"], run["run_id"])
        lines += [f"MLflow run: [{run['run_id']}]({link})" + ("" if served else " (serve it with `graft ui`)")]
    return "\n".join(lines) + "\n"
