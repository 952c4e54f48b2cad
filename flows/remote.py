"""graft's shared storage: the project's default DVC remote.

Configured the DVC way (``dvc remote add -d NAME URL``; credentials in
``.dvc/config.local`` with ``dvc remote modify --local``). After a successful run the flow
pushes what the run produced, DVC's run-cache included, so that a registered model's
inputs and outputs exist off this machine; before running stages whose outputs are
missing here (a fresh clone, a clean worker) it pulls them, so a teammate's clone of
the same commit restores instead of training. A failed push or pull never fails a run:
it is reported, recorded in ``.graft/remote.json`` for ``graft status``, and the next
run pushes again (DVC sends only what the remote lacks).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = Path(".graft") / "remote.json"
# DVC status entries meaning "the outputs are not in this workspace", as opposed to
# changed code, deps or params: only those stages are worth a pull.
_MISSING = ("deleted", "not in cache")


@dataclass(frozen=True)
class Remote:
    name: str
    url: str

    def __str__(self) -> str:
        return f"'{self.name}' ({self.url})"


def default_remote(root: Path) -> Remote | None:
    """The project's default DVC remote (``core.remote``), or None (also outside a DVC repository)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        return None
    with repo:
        config = repo.config
        name = config["core"].get("remote")
        if not name:
            return None
        return Remote(name, str(config["remote"].get(name, {}).get("url", "?")))


def describe(root: Path) -> str:
    """One line for `graft status`: the remote and how the last push went."""
    remote = default_remote(root)
    if remote is None:
        return "DVC remote: none (data and models stay in this copy; `dvc remote add -d NAME URL` to share them)"
    line = f"DVC remote: {remote}"
    state = last_push(root)
    if state:
        if state["ok"]:
            line += f"; last push {state['time']}: {state['message']}"
        else:
            line += f"; last push FAILED {state['time']}: {state['message']} (the next run pushes again)"
    return line


def last_push(root: Path) -> dict[str, Any] | None:
    from stages import fsio

    path = root / STATE_FILE
    return fsio.read_json(path) if path.is_file() else None


def _record(root: Path, remote: Remote, ok: bool, message: str) -> dict[str, Any]:
    from stages import fsio

    state = {"remote": remote.name, "url": remote.url, "ok": ok, "message": message,
             "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}  # fmt: skip
    (root / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    fsio.write_json(root / STATE_FILE, state)
    return state


def error_message(remote: Remote, e: BaseException) -> str:
    """What went wrong, for a person: DVC's own words, then what to check."""
    text = str(e).strip() or type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += f" ({str(cause).strip()})"
    return (f"DVC remote {remote}: {text}. Check that it is reachable and writable and that its credentials are "
            f"set (`dvc remote modify --local {remote.name} ...`), then run `dvc push --run-cache` or the next "
            f"`graft run`")  # fmt: skip


def push(root: Path, logger) -> dict[str, Any] | None:
    """Push the workspace's DVC-tracked outputs and the run-cache to the default remote.
    Returns the recorded state (None without a remote); never raises for the remote."""
    remote = default_remote(root)
    if remote is None:
        return None
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            count = repo.push(run_cache=True)
    except Exception as e:  # DVC raises many kinds here (network, auth, full disk): all are reported
        message = error_message(remote, e)
        logger.warning("push failed: %s", message)
        return _record(root, remote, False, message)
    message = f"{count} file(s) pushed" if count else "the remote already had everything"
    logger.info("DVC remote %s: %s", remote, message)
    return _record(root, remote, True, message)


def _only_missing(changes: list) -> bool:
    """True when DVC's changes for a stage are all missing outputs (and missing deps,
    the outputs of stages upstream), at least one of them an output of its own."""
    if not any(isinstance(c, dict) and "changed outs" in c for c in changes):
        return False
    for change in changes:
        if not isinstance(change, dict) or set(change) - {"changed outs", "changed deps"}:
            return False  # changed code, command or params: a pull cannot help
        if any(state not in _MISSING for paths in change.values() for state in paths.values()):
            return False
    return True


def missing_outputs(root: Path, stages: list[str]) -> list[str]:
    """Of these stages, those DVC sees as changed only because outputs are missing here
    (not because their code, deps or params changed): a pull can restore them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status(targets=[f"{root / 'dvc.yaml'}:{s}" for s in stages])
    return [key.rsplit(":", 1)[-1] for key, changes in status.items() if _only_missing(changes)]


def pull(root: Path, stages: list[str], logger) -> list[str]:
    """Pull, from the default remote, the outputs dvc.lock records for those of ``stages``
    whose outputs are missing here; return those of ``stages`` up to date afterwards."""
    remote = default_remote(root)
    if remote is None or not stages:
        return []
    wanted = missing_outputs(root, stages)
    if not wanted:
        return []
    from dvc.repo import Repo

    from flows.training import stale_stages

    try:
        with Repo(str(root)) as repo:
            repo.pull(targets=[f"{root / 'dvc.yaml'}:{s}" for s in wanted], run_cache=True, allow_missing=True)
    except Exception as e:
        logger.warning("pull failed, the stages run here instead: %s", error_message(remote, e))
        return []
    # Every stage the pull brought up to date: those whose outputs it restored, and those
    # downstream whose only change was those missing inputs (their own outputs are in git).
    still = set(stale_stages(root, stages))
    restored = [s for s in stages if s not in still]
    if restored:
        logger.info("DVC remote %s: restored %s", remote, ", ".join(restored))
    return restored
