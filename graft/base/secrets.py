"""Credentials, and the masking that keeps them out of everything graft prints or stores.

A credential comes from the environment variable of its name or, when that is unset, from
the same key in ``.graft/secrets.yaml``: a git-ignored file that must be readable by its
owner only (mode 0600, as ssh asks of a private key). The keys are the variables the
servers and their clients read themselves (MLflow's, Prefect's), plus graft's own, so one
name means one thing wherever it is set. ``graft.yaml``, which is in git, holds none.

Everything graft shows or records (logs, state files, MLflow params and tags,
notifications) passes URIs through :func:`mask_url` (password replaced) and webhook URLs
through :func:`url_host` (the URL of a Slack or Teams webhook is itself the secret).
"""

from __future__ import annotations

import json
import os
import re
import secrets as _random
import stat
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from graft.base import fsio
from graft.base.errors import GraftError

SECRETS_FILE = Path(".graft") / "secrets.yaml"

# key: what it is (the file's comments, and `graft server init-auth`)
KEYS = {
    # on the machine that runs the servers
    "MLFLOW_BACKEND_STORE_URI": "the MLflow server's store when it has a password, e.g. postgresql://graft:PASSWORD@db:5432/mlflow",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "password of the MLflow server's admin user (created on its first start)",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "the MLflow server's key for its CSRF tokens",
    "PREFECT_SERVER_API_AUTH_STRING": "user:password the Prefect server asks every client for",
    # on every machine that talks to them (the server's machine included)
    "MLFLOW_TRACKING_USERNAME": "this machine's MLflow user (default: the admin, where MLFLOW_AUTH_ADMIN_PASSWORD is set)",
    "MLFLOW_TRACKING_PASSWORD": "its password",
    "PREFECT_API_AUTH_STRING": "the Prefect server's user:password (default: PREFECT_SERVER_API_AUTH_STRING)",
    "GRAFT_WEBHOOK_URL": "where notifications are POSTed (a Slack or Teams webhook URL is a secret)",
}
ADMIN_USER = "admin"  # MLflow's admin user name (its own default, MLFLOW_AUTH_ADMIN_USERNAME overrides)


def secrets_path(root: Path) -> Path:
    return root / SECRETS_FILE


def read_file(root: Path) -> dict[str, str]:
    """The secrets file's keys (empty when there is none). A file others can read is
    refused rather than used: its contents may already have leaked."""

    path = secrets_path(root)
    if not path.is_file():
        return {}
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise GraftError(f"{path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`, "
                         "and change the credentials in it if others could have read them")  # fmt: skip
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise GraftError(f"{path}: expected KEY: value lines (keys: {', '.join(KEYS)})")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise GraftError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(KEYS)}")
    return {k: str(v) for k, v in data.items() if v not in (None, "")}


def get(root: Path, key: str) -> str | None:
    """``key`` from the environment, else from the secrets file (None when neither has it)."""
    if key not in KEYS:
        raise KeyError(key)
    return os.environ.get(key) or read_file(root).get(key)


def resolved(root: Path) -> dict[str, str]:
    """Every credential known here, with the clients' defaults filled in on the servers'
    own machine (the admin's MLflow login, the server's Prefect auth string)."""
    file = read_file(root)
    out = {k: v for k in KEYS if (v := os.environ.get(k) or file.get(k))}
    if "MLFLOW_TRACKING_USERNAME" not in out and "MLFLOW_AUTH_ADMIN_PASSWORD" in out:
        out["MLFLOW_TRACKING_USERNAME"] = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or ADMIN_USER
        out["MLFLOW_TRACKING_PASSWORD"] = out["MLFLOW_AUTH_ADMIN_PASSWORD"]
    if "PREFECT_API_AUTH_STRING" not in out and "PREFECT_SERVER_API_AUTH_STRING" in out:
        out["PREFECT_API_AUTH_STRING"] = out["PREFECT_SERVER_API_AUTH_STRING"]
    return out


def write_file(root: Path, values: dict[str, str]) -> Path:
    """Add ``values`` to the secrets file (keeping what it has), created 0600 from the
    start: never a moment where it is readable by others."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise KeyError(", ".join(unknown))
    path = secrets_path(root)
    merged = {**read_file(root), **values}
    lines = ["# graft's credentials on this machine: never commit this file (.graft/ is git-ignored), keep it",
             "# mode 0600. An environment variable of the same name wins over a line here.", ""]  # fmt: skip
    for key, what in KEYS.items():
        if key in merged:
            lines += [f"# {what}", f"{key}: {_quote(merged[key])}"]
    with fsio.atomic_path(path) as tmp:
        tmp.chmod(0o600)  # before a byte is written
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _quote(value: str) -> str:

    return json.dumps(value)  # a YAML double-quoted scalar


def new_password(nbytes: int = 24) -> str:
    return _random.token_urlsafe(nbytes)


# --- masking -------------------------------------------------------------------------------

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def mask_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced
    by ``***`` (SQLAlchemy's convention); the rest stays readable."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def url_host(url: str) -> str:
    """What may be shown of a webhook URL: its scheme and host, never the path or query
    that carries the token."""

    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "") + "/..."


def redact(text: str, values: list[str] | tuple[str, ...]) -> str:
    """``text`` with every occurrence of the given secret values replaced (an error message
    from a library may quote a whole URL)."""
    for value in sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, "***")
    return mask_url(text)
