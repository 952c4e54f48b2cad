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

import contextlib
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.pipeline import pipeline, stale_stages
from graft.base import fsio
from graft.base.errors import GraftError

STATE_FILE = Path(".graft") / "remote.json"
# dvc.lock files of runs whose push failed: their objects stay in the local cache and go
# with the next push that works, even when a later run has replaced them in the workspace
# (`dvc push` alone sends only what the current dvc.lock names).
PENDING_DIR = Path(".graft") / "unpushed"
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
    from dvc.exceptions import NotDvcRepoError  # DVC's API: imported where used
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

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
    path = root / STATE_FILE
    return fsio.read_json(path) if path.is_file() else None


def _record(root: Path, remote: Remote, ok: bool, message: str) -> dict[str, Any]:
    state = {"remote": remote.name, "url": remote.url, "ok": ok, "message": message,
             "time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}  # fmt: skip
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


def push(root: Path, logger, run_id: str | None = None) -> dict[str, Any] | None:
    """Push the workspace's DVC-tracked outputs and the run-cache to the default remote,
    and the outputs of earlier runs whose push failed. Returns the recorded state (None
    without a remote); never raises for the remote: a failure is recorded and queued
    (under ``run_id``, so that a run that pushes twice is queued once)."""
    remote = default_remote(root)
    if remote is None:
        return None
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    try:
        with Repo(str(root)) as repo:
            count = push_pending(root, repo) + repo.push(run_cache=True)
    except Exception as e:  # DVC raises many kinds here (network, auth, full disk): all are reported
        queued = queue_pending(root, run_id)
        message = error_message(remote, e)
        logger.warning("push failed: %s", message)
        return _record(root, remote, False, message + (f" ({queued} run(s) waiting to be pushed)" if queued else ""))
    message = f"{count} file(s) pushed" if count else "the remote already had everything"
    logger.info("DVC remote %s: %s", remote, message)
    return _record(root, remote, True, message)


def _lock_objects(lock_text: str) -> list:
    """The cached objects a dvc.lock names (every stage's outputs; directories as their
    ``.dir`` manifests, which DVC's transfer expands to their files)."""
    from dvc_data.hashfile.hash_info import HashInfo  # DVC's API: ~0.3 s of import, paid where the cache is read

    lock = yaml.safe_load(lock_text) or {}
    objs = []
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("md5"):
                objs.append(HashInfo(out.get("hash", "md5"), out["md5"]))
    return objs


def queue_pending(root: Path, run_id: str | None = None) -> int:
    """Keep this run's dvc.lock until a push succeeds; return how many runs wait."""
    lock = root / "dvc.lock"
    if lock.is_file():
        data = lock.read_bytes()
        fsio.write_bytes(root / PENDING_DIR / f"{run_id or fsio.sha256_bytes(data)[:16]}.lock", data)
    return len(list((root / PENDING_DIR).glob("*.lock")))


def _with_contents(repo, objs: list) -> list:
    """``objs`` and, for each directory, its files: DVC's transfer sends a directory's
    files only when they are listed beside its ``.dir`` manifest, and a remote holding a
    manifest is taken to hold the whole directory. An object gone from the local cache
    (`dvc gc`) is left out; DVC then withholds its directory's manifest too."""
    from dvc_data.hashfile.tree import Tree  # DVC's API: ~0.3 s of import, paid where the cache is read

    cache = repo.cache.local
    out = []
    for obj in objs:
        if not cache.exists(obj.value):
            continue
        out.append(obj)
        if obj.isdir:
            out.extend(oid for _, _, oid in Tree.load(cache, obj))
    return out


def push_pending(root: Path, repo) -> int:
    """Push the objects of queued runs (oldest first); a run leaves the queue once all its
    objects are on the remote. Raises if the remote refuses any."""
    files = sorted((root / PENDING_DIR).glob("*.lock"), key=lambda f: f.stat().st_mtime)
    sent = 0
    for f in files:
        result = repo.cloud.push(_with_contents(repo, _lock_objects(f.read_text())))
        if result.failed:
            raise RuntimeError(f"{len(result.failed)} object(s) of the run recorded in {f} could not be pushed")
        sent += len(result.transferred)
        f.unlink()
    return sent


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
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    with Repo(str(root)) as repo:
        status = repo.status(targets=[f"{root / 'dvc.yaml'}:{s}" for s in stages])
    return [key.rsplit(":", 1)[-1] for key, changes in status.items() if _only_missing(changes)]


def pull_run_cache(root: Path, logger) -> bool:
    """Fetch the remote's run-cache (``dvc pull --run-cache``: small YAML records of every
    stage run pushed there, by any machine). With it, ``dvc repro --pull`` restores a stage
    that another copy ran, even one whose dvc.lock never reached git (a worker's run).
    Returns whether it worked; a failure is reported and the stages simply run here."""
    remote = default_remote(root)
    if remote is None:
        return False
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    try:
        with Repo(str(root)) as repo:
            repo.stage_cache.pull(None)
    except Exception as e:
        logger.warning("could not read the run-cache, the stages run here instead: %s", error_message(remote, e))
        return False
    return True


MISSING_MARK = "do not exist neither locally nor on remote"  # DVC's warning, then a "name: ..." line per file


class MissingOutputs:
    """DVC's warning about files dvc.lock names that are in no cache and on no remote: a
    line per file, repeated by every pull of a stage. Gathered here and said once, in
    words a person acts on (:meth:`summary`)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self._listing = False

    def swallow(self, line: str) -> bool:
        """True for a line of that warning (taken note of, not to be shown)."""
        if MISSING_MARK in line:
            self._listing = True
            return True
        if self._listing and line.lstrip().startswith("name: "):
            self.names.add(line.strip()[len("name: "):].split(",")[0])
            return True
        self._listing = False
        return False

    def summary(self, who: str) -> str | None:
        if not self.names:
            return None
        return (f"{who}: dvc.lock names {len(self.names)} file(s) that are in no DVC cache and on no remote (a lock "
                "committed from a run that never pushed): what DVC cannot restore is computed here")  # fmt: skip


class _Gather(logging.Filter):
    """Takes DVC's in-process missing-files warning off the log, into a MissingOutputs."""

    def __init__(self, notes: MissingOutputs):
        super().__init__()
        self.notes = notes

    def filter(self, record: logging.LogRecord) -> bool:
        lines = record.getMessage().splitlines()
        if not lines or MISSING_MARK not in lines[0]:
            return True
        for line in lines:
            self.notes.swallow(line)
        return False


def pull(root: Path, stages: list[str], logger) -> list[str]:
    """Pull, from the default remote, the outputs dvc.lock records for those of ``stages``
    whose outputs are missing here; return those of ``stages`` up to date afterwards."""
    remote = default_remote(root)
    if remote is None or not stages:
        return []
    wanted = missing_outputs(root, stages)
    if not wanted:
        return []
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    notes, dvc_log = MissingOutputs(), logging.getLogger("dvc.data_cloud")
    gather = _Gather(notes)
    dvc_log.addFilter(gather)
    try:
        with Repo(str(root)) as repo:
            repo.pull(targets=[f"{root / 'dvc.yaml'}:{s}" for s in wanted], run_cache=True, allow_missing=True)
    except Exception as e:
        logger.warning("pull failed, the stages run here instead: %s", error_message(remote, e))
        return []
    finally:
        dvc_log.removeFilter(gather)
    if notes.summary(f"DVC remote {remote}"):
        logger.warning("%s", notes.summary(f"DVC remote {remote}"))
    # Every stage the pull brought up to date: those whose outputs it restored, and those
    # downstream whose only change was those missing inputs (their own outputs are in git).
    still = set(stale_stages(root, stages))
    restored = [s for s in stages if s not in still]
    if restored:
        logger.info("DVC remote %s: restored %s", remote, ", ".join(restored))
    return restored


def pull_all(root: Path) -> dict[str, Any]:
    """``dvc pull --run-cache --allow-missing``: every output dvc.lock records that the
    remote holds, and the remote's run-cache (so `graft run` restores what other copies
    ran). Raises GraftError, naming the remote, when there is none or it fails."""
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    remote = default_remote(root)
    if remote is None:
        raise GraftError(f"{root}: no default DVC remote to pull from; add one with `dvc remote add -d NAME URL`")
    try:
        with Repo(str(root)) as repo:
            before = cache_bytes(repo)
            result = repo.pull(run_cache=True, allow_missing=True) or {}
            arrived = cache_bytes(repo) - before
    except Exception as e:
        raise GraftError(error_message(remote, e)) from e
    # DVC's counts: "stats" holds the objects fetched; the top level, per output, what was checked out.
    return {"remote": remote, "fetched": int(result.get("stats", {}).get("fetched", 0)), "fetched_mb": arrived / 1e6,
            "changed": sum(len(result.get(k) or []) for k in ("added", "modified"))}  # fmt: skip


def cache_bytes(repo) -> int:
    """The bytes this DVC cache holds."""
    root = Path(repo.cache.local.path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def restore_past_the_lock(root: Path, stages: list[str] | None, pull: bool, logger=None) -> list[str]:
    """Restore from DVC's run-cache the stale stages whose dvc.lock entry names outputs that
    exist nowhere (neither in this cache nor on the remote), such as a committed lock from
    a run on another machine that never pushed.

    DVC takes a stage's lock entry whenever the stage's code, params and inputs match it,
    and so never reads its run-cache for that stage (``StageCache.restore``): a teammate's
    clone retrains what the remote's run-cache holds, the same inputs run elsewhere. Here
    such a stage forgets the outputs its lock names, DVC looks its inputs up in the
    run-cache and checks the outputs out, and the lock entry is rewritten to name them.
    Stages whose lock outputs can be had, or that changed, are left to ``dvc repro``.
    ``stages``: those to consider (None: all); ``pull``: the run-cache's outputs may come
    from the remote. Returns the stages restored."""
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    restored: list[str] = []
    # DVC's run-cache builds the cached stage from the relative path "dvc.yaml": it works
    # from the repository's root only, as DVC's own commands do.
    with contextlib.chdir(root), Repo(str(root)) as repo, repo.lock:
        for name in pipeline(root).order:
            if stages is not None and name not in stages:
                continue
            stage = repo.stage.collect(f"{root / 'dvc.yaml'}:{name}")[0]
            try:
                if not stage.status():
                    continue
                lock_applies = not stage.changed_stage() and stage.deps_cached() and all(o.hash_info for o in stage.outs)
                if not lock_applies or stage.outs_cached():
                    continue  # changed (the run-cache is read anyway), or the lock's outputs are at hand
                for out in stage.outs:
                    out.clear()
                repo.stage_cache.restore(stage, pull=pull)
                stage.save(run_cache=False)
                stage.dump(update_pipeline=False)
            except Exception as e:  # no run-cache entry, an output on no remote either: the stage runs
                if logger is not None:
                    logger.debug("%s: not restored from the run-cache (%s: %s)", name, type(e).__name__, e)
                continue
            restored.append(name)
    if restored and logger is not None:
        logger.info("restored from DVC's run-cache (the same inputs ran elsewhere; the outputs dvc.lock named are on "
                    "no remote): %s", ", ".join(restored))  # fmt: skip
    return restored


def restore_from_run_cache(root: Path) -> list[str]:
    """Check out, without running anything, the outputs of every stale stage that DVC's
    run-cache knows (what `dvc repro` does before it would run a stage's command): a
    stage another copy ran with the same code, params and inputs. Goes in pipeline order,
    since a stage's key needs its inputs in place. Returns the stages restored."""
    from dvc.repo import Repo  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read
    from dvc.stage.cache import RunCacheNotFoundError  # DVC's API: imported where used

    restored = []
    with contextlib.chdir(root), Repo(str(root)) as repo, repo.lock:  # from the root: see restore_past_the_lock
        for name in pipeline(root).order:
            stage = repo.stage.collect(f"{root / 'dvc.yaml'}:{name}")[0]
            if not stage.status():
                continue
            try:
                repo.stage_cache.restore(stage, pull=True)
            except (RunCacheNotFoundError, FileNotFoundError):  # no record, or an input is missing
                continue
            restored.append(name)
    return restored
