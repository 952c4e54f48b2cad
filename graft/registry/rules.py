"""The model registry's rules: aliases with a history.

MLflow keeps no history of alias moves, so graft records every move (when, which alias,
from which version to which, why, by which run and user) as a tag on the registered
model (``graft.alias_history.<n>``, one small JSON document each).

The history is also the write-ahead record that makes registration survive ``kill -9``:
a move is written as ``intended`` before the alias moves and marked ``done`` after; a new
version carries ``graft.state=pending`` until its alias is set. :func:`repair` finishes or
undoes whatever a killed process left: a move whose alias did change is marked done, one
whose alias did not is marked aborted, and a pending version that never got its alias is
deleted.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

from graft.base.errors import GraftError, fault_point
from graft.tracking.runs import host_creds

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_PREFIX = "graft.alias_history."
STATE_TAG = "graft.state"  # on a model version: pending until its alias is set, then ready
# On a model version: graft.models.modeling.identity of what it serves. One model, one
# version: a run that ends with the very same model is linked to it, not registered again.
MODEL_TAG = "graft.model_sha256"
ALSO_TAG = "graft.also_registered_by"  # on a model version: the later runs that ended with it
ALSO_KEPT = 100  # run ids kept in ALSO_TAG (a tag value holds 5,000 characters)


# --- aliases with history (MLflow) ---------------------------------------------------------


def alias_version(client, name: str, alias: str):
    """The model version behind ``alias``, or None."""
    from mlflow.exceptions import MlflowException  # MLflow: imported where used

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_of_model(client, name: str, identity: str):
    """The ready version of ``name`` that serves exactly this model (its :data:`MODEL_TAG`
    is ``identity``), or None. Versions registered before the tag existed are not matched."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(MODEL_TAG) == identity and mv.tags.get(STATE_TAG, "ready") == "ready":
            return mv
    return None


SERVING_METRICS = ("latency_ms_b1", "latency_ms_b1_p95", "throughput_b64")  # logged by evaluate as serving_<name>


def recorded_serving(client, mv) -> dict[str, float] | None:
    """A version's serving cost as ``evaluate`` measured it once, on the run the version was
    registered from (metrics ``serving_*``); None where it was not recorded."""
    if mv is None or not getattr(mv, "run_id", None):
        return None
    try:
        metrics = client.get_run(mv.run_id).data.metrics
    except Exception:  # a deleted run: nothing recorded
        return None
    found = {k: float(metrics[f"serving_{k}"]) for k in SERVING_METRICS if f"serving_{k}" in metrics}
    return found if "latency_ms_b1" in found else None


def link_run(client, name: str, version: str, run_id: str) -> None:
    """Record on ``version`` that ``run_id`` ended with the very model it serves."""
    mv = client.get_model_version(name, version)
    runs = [r for r in mv.tags.get(ALSO_TAG, "").split(",") if r and r != run_id]
    client.set_model_version_tag(name, version, ALSO_TAG, ",".join([*runs, run_id][-ALSO_KEPT:]))


def held_alias(mv) -> str | None:
    """The alias of graft's that a version holds (champion first), or None."""
    aliases = set(getattr(mv, "aliases", None) or [])
    return next((a for a in (CHAMPION, CHALLENGER) if a in aliases), None)


def _history_tags(client, name: str) -> list[tuple[str, dict[str, Any]]]:
    from mlflow.exceptions import MlflowException  # MLflow: imported where used

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return []
    return [(k, json.loads(v)) for k, v in sorted(tags.items()) if k.startswith(HISTORY_PREFIX)]


def history(client, name: str, done_only: bool = False) -> list[dict[str, Any]]:
    """Every recorded alias move, oldest first; ``done_only`` drops moves that were
    intended but never happened (aborted) or are still under way."""
    entries = [e for _, e in _history_tags(client, name)]
    return [e for e in entries if e.get("state", "done") == "done"] if done_only else entries


def current_user() -> str:
    """Who moved an alias: the MLflow user a tracking server authenticated (it refused the
    request otherwise), else ``GRAFT_USER`` (a service account, a CI job), else the OS user."""

    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    if os.environ.get("MLFLOW_TRACKING_USERNAME") and mlflow.get_tracking_uri().startswith(("http://", "https://")):
        return os.environ["MLFLOW_TRACKING_USERNAME"]
    try:
        return os.environ.get("GRAFT_USER") or getpass.getuser()
    except Exception:  # no name for this uid (a bare container)
        return f"uid {os.getuid()}"


# --- who may move the champion --------------------------------------------------------------

CHAMPION_PERMISSION = "MANAGE"  # EDIT registers versions and sets the challenger; crowning one is a manager's call


class NotAllowed(GraftError):
    """The authenticated user lacks the permission an alias move needs."""


def permission_on_model(client, name: str) -> tuple[str, str] | None:
    """(user, permission) on registered model ``name`` as the tracking server's own
    authorization resolves it (MLflow's basic-auth app: grants, roles, its default), or
    None where nobody is authenticated (a local store, a server without authentication)."""
    from mlflow.utils.rest_utils import http_request  # MLflow: imported where used

    creds = host_creds(client)
    if creds is None:
        return None
    me = http_request(creds, "/api/2.0/mlflow/users/current", "GET")
    if me.status_code == 404:  # no auth app on this server
        return None
    if me.status_code != 200:
        raise GraftError(f"the tracking server refused to say who is logged in (HTTP {me.status_code}): "
                         "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")  # fmt: skip
    user = me.json()["user"]
    if user.get("is_admin"):
        return user["username"], "MANAGE"  # the admin passes every check
    got = http_request(creds, "/api/3.0/mlflow/users/permissions/get", "GET",
                       params={"username": user["username"], "resource_type": "registered_model", "resource_id": name})  # fmt: skip
    if got.status_code != 200:
        raise GraftError(f"the tracking server did not answer what {user['username']} may do on {name} (HTTP {got.status_code})")
    return user["username"], got.json()["permission"]


def may_move_champion(client, name: str) -> tuple[bool, str]:
    """Whether this user may move ``champion`` of ``name``, and if not, a message that
    says who, what is needed and how to get it."""
    found = permission_on_model(client, name)
    if found is None or found[1] == CHAMPION_PERMISSION:
        return True, ""
    user, permission = found
    return False, (f"{user} is not allowed to move the champion of {name} (needs {CHAMPION_PERMISSION}, has {permission}); "
                   f"an admin grants it with `graft server user grant {user} --permission {CHAMPION_PERMISSION}`")  # fmt: skip


def require_champion_permission(client, name: str) -> None:
    allowed, why = may_move_champion(client, name)
    if not allowed:
        raise NotAllowed(why)


def _entry(alias: str, previous, version: str | None, reason: str, run_id: str | None, kind: str) -> dict[str, Any]:
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "alias": alias,
        "from_version": str(previous.version) if previous else None,
        "to_version": str(version) if version is not None else None,
        "reason": reason,
        "run_id": run_id,
        "user": current_user(),
        "kind": kind,  # move | rollback | removal
        "state": "intended",
    }


def _set_entry(client, name: str, key: str, entry: dict[str, Any]) -> None:
    client.set_registered_model_tag(name, key, json.dumps(entry))


def _apply(client, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Write ``entry`` ahead, move (or remove) the alias, mark the entry done. A champion
    move the user may not make is refused before anything is written."""
    if entry["alias"] == CHAMPION:
        require_champion_permission(client, name)
    key = f"{HISTORY_PREFIX}{len(_history_tags(client, name)):06d}"
    _set_entry(client, name, key, entry)
    fault_point("after_history")
    try:
        if entry["to_version"] is None:
            client.delete_registered_model_alias(name, entry["alias"])
        else:
            client.set_registered_model_alias(name, entry["alias"], entry["to_version"])
    except BaseException:
        try:
            _set_entry(client, name, key, {**entry, "state": "aborted"})
        except Exception:
            pass  # repair() settles it from the alias itself
        raise
    fault_point("after_alias")
    entry = {**entry, "state": "done"}
    _set_entry(client, name, key, entry)
    describe(client, name)
    return entry


def moved_outside(client, name: str, alias: str = CHAMPION) -> str | None:
    """A word when ``alias`` points where graft's history does not say it moved: set in
    MLflow's UI or API, past graft's gate. None when the history accounts for it."""
    moves = history(client, name)
    if not moves:  # a model graft never moved an alias of (registered before its history): nothing to compare
        return None
    current = alias_version(client, name, alias)
    done = [h for h in moves if h["alias"] == alias and h.get("state", "done") == "done"]
    recorded = done[-1]["to_version"] if done else None
    here = str(current.version) if current is not None else None
    if here == recorded:
        return None
    was = f"v{recorded}" if recorded else "nowhere"
    if here is None:
        return (f"{alias} was removed outside graft (graft's history has it at {was}); "
                f"`graft promote {recorded}` sets it again through the gate")
    return (f"{alias} points at v{here}, but graft's history has it at {was}: it was moved outside graft (MLflow's "
            f"UI or API), past the gate; `graft promote {here}` runs the gate, `graft rollback` goes back")


def describe(client, name: str) -> None:
    """The registered model's description, as MLflow's registry page shows it: what the
    model does and where its aliases stand, in words (the JSON tags stay the record)."""
    try:
        champion = alias_version(client, name, CHAMPION)
        challenger = alias_version(client, name, CHALLENGER)
        moves = history(client, name, done_only=True)[-3:]
        lines = [f"Registered by graft: each version is a fine-tuned classifier, promoted to `{CHAMPION}` only when "
                 "it beats the champion on the same test samples (`graft status` shows the same; the alias history "
                 f"is in the `{HISTORY_PREFIX}*` tags)."]
        if champion is not None:
            t = champion.tags
            acc = f", test accuracy {float(t['test_accuracy']):.4f}" if "test_accuracy" in t else ""
            lines.append(f"\n**Champion:** v{champion.version}{acc}, data {t.get('data_version', '?')[:12]}, "
                         f"commit {t.get('git_commit', '?')[:10]}.")
        if challenger is not None:
            lines.append(f"**Challenger:** v{challenger.version}.")
        if moves:
            lines.append("\n**Last moves:**\n" + "\n".join(
                f"- {h['time'][:16].replace('T', ' ')} {h['alias']} -> "
                f"{'v' + h['to_version'] if h['to_version'] else '(removed)'}: {h['reason']}" for h in moves))
        client.update_registered_model(name, description="\n".join(lines))
    except Exception:  # a description is for people: never worth failing a move over
        pass


def move_alias(client, name: str, alias: str, version: str, reason: str, run_id: str | None = None,
               kind: str = "move") -> dict[str, Any]:  # fmt: skip
    """Point ``alias`` at ``version``, recorded ahead in the history (see the module doc)."""
    previous = alias_version(client, name, alias)
    return _apply(client, name, _entry(alias, previous, version, reason, run_id, kind))


def remove_alias(client, name: str, alias: str, reason: str, run_id: str | None = None) -> dict[str, Any] | None:
    """Clear ``alias`` (if set), recorded like a move (``to_version`` null)."""
    previous = alias_version(client, name, alias)
    if previous is None:
        return None
    return _apply(client, name, _entry(alias, previous, None, reason, run_id, "removal"))


def champion_stack(moves: list[dict[str, Any]]) -> list[str]:
    """The champions in order, as rollbacks see them: a promotion pushes its version, a
    rollback pops the one it replaced. The last element is the current champion, the one
    before it is where a rollback goes (never forward to a model rolled back from)."""
    stack: list[str] = []
    for h in moves:
        if h["alias"] != CHAMPION or h.get("state", "done") != "done":
            continue
        if h.get("kind") == "rollback":
            if stack:
                stack.pop()
        elif h["to_version"] is None:
            stack.clear()
        else:
            stack.append(h["to_version"])
    return stack


def repair(client, name: str, min_age_seconds: float = 0.0) -> list[str]:
    """Finish or undo what a killed registration or alias move left behind; return one
    line per repair. Leftovers younger than ``min_age_seconds`` are left alone: a caller
    that cannot rule out a registration under way (``graft status`` beside a plain
    ``dvc repro``) passes a few minutes; ``register`` itself, which the project's locks
    serialise, passes 0."""
    now = time.time()
    repaired = []
    for key, entry in _history_tags(client, name):
        if entry.get("state", "done") != "intended":
            continue
        if now - datetime.fromisoformat(entry["time"]).timestamp() < min_age_seconds:
            continue
        current = alias_version(client, name, entry["alias"])
        moved = (str(current.version) if current else None) == entry["to_version"]
        _set_entry(client, name, key, {**entry, "state": "done" if moved else "aborted"})
        what = f"{entry['alias']} v{entry['from_version'] or '-'} -> v{entry['to_version'] or '-'}"
        repaired.append(f"alias move {what}: " + ("it happened; recorded as done" if moved else "it never happened; recorded as aborted"))
    done = history(client, name, done_only=True)
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(STATE_TAG) != "pending" or now - mv.creation_timestamp / 1000 < min_age_seconds:
            continue
        version = str(mv.version)
        if any(h["to_version"] == version for h in done):
            client.set_model_version_tag(name, version, STATE_TAG, "ready")
            repaired.append(f"v{version}: its alias was set before the interruption; marked ready")
        else:
            client.delete_model_version(name, version)
            repaired.append(f"v{version}: registration was interrupted before its alias was set; version deleted")
    return repaired


def wait_until_ready(client, name: str, version: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise GraftError(f"model version {name} v{version} did not become ready (status {mv.status})")
        time.sleep(0.5)
