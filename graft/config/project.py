"""``graft.yaml``: how graft runs (Prefect task options per stage, the servers, schedules,
workers, the thread count), parsed once into typed, frozen sections like params.yaml.

An unknown section or key anywhere in the file is an error that names it, so a misspelt
``servers.mlfow`` fails at once instead of silently falling back to a default. Secrets
never belong here (the file is in git): a password in a store URI or a webhook URL is
refused, naming where it goes instead.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml

from graft.base import secrets
from graft.base.errors import GraftError
from graft.config.params import ParamsError, parse

CONFIG_FILE = "graft.yaml"
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


@dataclass(frozen=True)
class StageOptions:
    retries: int = 0
    retry_delay_seconds: float = 5.0
    timeout_seconds: float | None = 3600.0  # a stage running longer is stopped (its process group killed)


@dataclass(frozen=True)
class PrefectServer:
    port: int = 4200
    host: str = "127.0.0.1"  # the address it listens on; 0.0.0.0: every interface (other machines)


@dataclass(frozen=True)
class MlflowServer:
    port: int = 5000
    host: str = "127.0.0.1"
    backend_store_uri: str | None = None  # null: the project's SQLite file (a password: secrets only)
    default_permission: str = "READ"  # with authentication: what a user may do where nobody granted more

    def validate(self) -> None:
        uri = self.backend_store_uri
        if uri and secrets.mask_url(uri) != uri:
            raise GraftError("servers.mlflow.backend_store_uri in graft.yaml holds a password, and graft.yaml is in git: "
                             "remove it there and set MLFLOW_BACKEND_STORE_URI in the environment or in "
                             f"{secrets.SECRETS_FILE} (mode 0600); then change that password, it may be in git's history")  # fmt: skip
        if self.default_permission not in PERMISSIONS:
            raise GraftError(f"servers.mlflow.default_permission: {self.default_permission!r} is not one of "
                             f"{', '.join(PERMISSIONS)}")  # fmt: skip


@dataclass(frozen=True)
class ServersConfig:
    auth: bool = False  # ask for credentials even on loopback (shared users, a reverse proxy)
    prefect: PrefectServer = field(default_factory=PrefectServer)
    mlflow: MlflowServer = field(default_factory=MlflowServer)


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    overrides: tuple[str, ...] = ()
    concurrency: Literal["skip", "wait"] = "skip"


@dataclass(frozen=True)
class SensorConfig:
    cron: str = "*/30 * * * *"
    # change: retrain whenever the source changed; drift: only when the changed source also
    # drifted from the champion's reference (stage drift's test), or there is none to test
    trigger: str = "change"

    def validate(self) -> None:
        if self.trigger not in ("change", "drift"):
            raise GraftError(f"graft.yaml: sensor.trigger must be change or drift, got {self.trigger!r}")


@dataclass(frozen=True)
class VerifyConfig:
    cron: str = "0 4 * * 0"  # `graft schedule --verify`: reproduce the champion every Sunday at 04:00


@dataclass(frozen=True)
class WorkersConfig:
    """How a worker's run proves it is alive: a heartbeat every ``heartbeat_seconds``
    (Prefect accepts no less than 30); none for ``crashed_after_seconds`` and the server
    marks the run Crashed (its worker or machine died)."""

    heartbeat_seconds: int = 30
    crashed_after_seconds: int = 90

    def validate(self) -> None:
        if self.heartbeat_seconds < 30:
            raise GraftError("graft.yaml: workers.heartbeat_seconds must be at least 30 (Prefect's minimum)")
        if self.crashed_after_seconds <= self.heartbeat_seconds:
            raise GraftError("graft.yaml: workers.crashed_after_seconds must exceed workers.heartbeat_seconds")


@dataclass(frozen=True)
class ComputeConfig:
    threads: int | str | None = None  # torch's threads per stage: a number, or auto (sized to the free CPUs)


@dataclass(frozen=True)
class NotificationsConfig:
    # The webhook URL is itself a credential: GRAFT_WEBHOOK_URL (environment or secrets file)
    webhook_url: str | None = None

    def validate(self) -> None:
        if self.webhook_url:
            raise GraftError("graft.yaml's notifications.webhook_url is not used: a webhook URL is a secret and "
                             "graft.yaml is in git; move it to GRAFT_WEBHOOK_URL in .graft/secrets.yaml (mode 0600) or the environment, "
                             "then rotate the webhook: it is in git's history")  # fmt: skip


@dataclass(frozen=True)
class ProjectConfig:
    """The whole of graft.yaml; every section has defaults, so the file may be absent."""

    stages: dict[str, StageOptions] = field(default_factory=dict)  # "default" and one entry per stage, overlaid
    servers: ServersConfig = field(default_factory=ServersConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sensor: SensorConfig = field(default_factory=SensorConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)

    def stage(self, name: str) -> StageOptions:
        """The ``default`` options overlaid with the stage's own."""
        return self.stages.get(name) or self.stages.get("default") or StageOptions()


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _stages(raw: object) -> dict[str, StageOptions]:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{CONFIG_FILE}: stages: expected a mapping of stage names, got {raw!r}")
    default = parse(StageOptions, raw.get("default") or {}, "stages.default", CONFIG_FILE)
    out = {"default": default}
    for name, own in raw.items():
        if name != "default":
            out[name] = parse(StageOptions, {**default.__dict__, **(own or {})}, f"stages.{name}", CONFIG_FILE)
    return out


_cache: dict[Path, tuple[object, ProjectConfig]] = {}


def load(root: Path | None = None) -> ProjectConfig:
    """The project's graft.yaml (``root``: the project folder, default the working
    directory), parsed and checked; read again only when the file changes."""
    path = (Path(root) if root is not None else Path.cwd()).resolve() / CONFIG_FILE
    stat = path.stat() if path.is_file() else None
    mtime = (stat.st_mtime_ns, stat.st_size) if stat else None
    hit = _cache.get(path)
    if hit and hit[0] == mtime:
        return hit[1]
    data = _read(path)
    known = [f.name for f in fields(ProjectConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ParamsError(f"{CONFIG_FILE}: unknown section(s) {', '.join(unknown)}; known: {', '.join(known)}")
    types = typing.get_type_hints(ProjectConfig)
    try:
        parsed = {k: parse(types[k], v, k, CONFIG_FILE) for k, v in data.items() if k != "stages" and v is not None}
        cfg = ProjectConfig(stages=_stages(data.get("stages")), **parsed)
    except ParamsError as e:  # a value's type: say which file it is in
        raise ParamsError(str(e) if str(e).startswith(CONFIG_FILE) else f"{CONFIG_FILE}: {e}") from None
    _cache[path] = (mtime, cfg)
    return cfg


def stage_options(root: Path, stage: str) -> StageOptions:
    """The ``default`` options overlaid with the stage's own."""
    return load(root).stage(stage)
