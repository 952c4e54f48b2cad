"""``graft.yaml``: how graft runs (Prefect task options per stage, the servers, schedules,
workers, the thread count), parsed once into typed, frozen sections like params.yaml.

An unknown section or key anywhere in the file is an error that names it, so a misspelt
``servers.mlfow`` fails at once instead of silently falling back to a default. Secrets
never belong here (the file is in git): a password in a store URI or a webhook URL is
refused, naming where it goes instead.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from graft.base import secrets
from graft.config.params import SECTION, Bool, Float, Int, ParamsError, Str, Strs, parse

CONFIG_FILE = "graft.yaml"
Permission = Literal["READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"]
PERMISSIONS: tuple[str, ...] = get_args(Permission)


@dataclass(frozen=True, config=SECTION)
class StageOptions:
    retries: Int = Field(default=0, ge=0, description="times a failed stage is tried again")
    retry_delay_seconds: Float = Field(default=5.0, ge=0, description="seconds between tries")
    timeout_seconds: Float | None = Field(default=3600.0, gt=0, description="a stage running longer is stopped (its process "
                                          "group killed); null: no limit")  # fmt: skip


@dataclass(frozen=True, config=SECTION)
class PrefectServer:
    port: Int = Field(default=4200, ge=1, le=65535, description="the port its API and UI listen on")
    host: Str = Field(
        default="127.0.0.1", description="the address it listens on; 0.0.0.0: every interface (other machines)"
    )


@dataclass(frozen=True, config=SECTION)
class MlflowServer:
    port: Int = Field(default=5000, ge=1, le=65535, description="the port its API and UI listen on")
    host: Str = Field(
        default="127.0.0.1", description="the address it listens on; 0.0.0.0: every interface (other machines)"
    )
    backend_store_uri: Str | None = Field(default=None, description="the tracking store (postgresql://...); null: the project's "
                                          "SQLite file. A password belongs in the secrets file, never here")  # fmt: skip
    default_permission: Permission = Field(
        default="READ", description="with authentication: what a user may do where nobody granted more"
    )

    @model_validator(mode="after")
    def _no_password(self) -> MlflowServer:
        uri = self.backend_store_uri
        if uri and secrets.mask_url(uri) != uri:
            raise ValueError("servers.mlflow.backend_store_uri in graft.yaml holds a password, and graft.yaml is in git: "
                             "remove it there and set MLFLOW_BACKEND_STORE_URI in the environment or in "
                             f"{secrets.SECRETS_FILE} (mode 0600); then change that password, it may be in git's history")  # fmt: skip
        return self


@dataclass(frozen=True, config=SECTION)
class ServersConfig:
    auth: Bool = Field(
        default=False, description="ask for credentials even on loopback (shared users, a reverse proxy)"
    )
    prefect: PrefectServer = Field(default=PrefectServer(), description="the Prefect server")
    mlflow: MlflowServer = Field(default=MlflowServer(), description="the MLflow server")


@dataclass(frozen=True, config=SECTION)
class ScheduleConfig:
    cron: Str = Field(default="0 3 * * *", description="when `graft schedule` retrains (cron syntax)")
    timezone: Str = Field(default="UTC", description="the cron's time zone")
    overrides: Strs = Field(default=(), description="section.key=value overrides for the scheduled runs")
    concurrency: Literal["skip", "wait"] = Field(default="skip", description="a run still training when the next is due: skip "
                                                  "the new one, or wait for it")  # fmt: skip


@dataclass(frozen=True, config=SECTION)
class SensorConfig:
    cron: Str = Field(default="*/30 * * * *", description="when the data sensor looks at the source (cron syntax)")
    trigger: Literal["change", "drift"] = Field(
        default="change",
        description="change: retrain whenever the source changed; drift: only when the changed source also "
        "drifted from the champion's reference (stage drift's test), or there is none to test",
    )


@dataclass(frozen=True, config=SECTION)
class VerifyConfig:
    cron: Str = Field(default="0 4 * * 0", description="`graft schedule --verify`: when the champion is reproduced")


@dataclass(frozen=True, config=SECTION)
class WorkersConfig:
    """How a worker's run proves it is alive: a heartbeat every ``heartbeat_seconds``
    (Prefect accepts no less than 30); none for ``crashed_after_seconds`` and the server
    marks the run Crashed (its worker or machine died)."""

    heartbeat_seconds: Int = Field(
        default=30, ge=30, description="how often a worker's run says it is alive (Prefect's minimum: 30)"
    )
    crashed_after_seconds: Int = Field(default=90, description="no heartbeat for this long: the run is marked Crashed")

    @model_validator(mode="after")
    def _grace(self) -> WorkersConfig:
        if self.crashed_after_seconds <= self.heartbeat_seconds:
            raise ValueError("graft.yaml: workers.crashed_after_seconds must exceed workers.heartbeat_seconds")
        return self


@dataclass(frozen=True, config=SECTION)
class ComputeConfig:
    threads: Int | Str | None = Field(default=None, description="torch's threads per stage: a number, or auto (sized to the "
                                      "free CPUs); null: auto")  # fmt: skip


@dataclass(frozen=True, config=SECTION)
class NotificationsConfig:
    webhook_url: Str | None = Field(default=None, description="refused: a webhook URL is a credential; set GRAFT_WEBHOOK_URL in "
                                    "the environment or the secrets file")  # fmt: skip

    @model_validator(mode="after")
    def _no_secret(self) -> NotificationsConfig:
        if self.webhook_url:
            raise ValueError("graft.yaml's notifications.webhook_url is not used: a webhook URL is a secret and "
                             "graft.yaml is in git; move it to GRAFT_WEBHOOK_URL in .graft/secrets.yaml (mode 0600) or the environment, "
                             "then rotate the webhook: it is in git's history")  # fmt: skip
        return self


@dataclass(frozen=True, config=SECTION)
class ProjectConfig:
    """The whole of graft.yaml; every section has defaults, so the file may be absent."""

    stages: dict[str, StageOptions] = Field(default_factory=dict, description="Prefect's task options: `default`, "
                                            "overlaid by one entry per stage")  # fmt: skip
    servers: ServersConfig = Field(default=ServersConfig(), description="`graft server start`'s servers")
    schedule: ScheduleConfig = Field(default=ScheduleConfig(), description="`graft schedule`'s retraining")
    sensor: SensorConfig = Field(default=SensorConfig(), description="`graft schedule --sensor`'s data sensor")
    verify: VerifyConfig = Field(default=VerifyConfig(), description="`graft schedule --verify`'s reproduction")
    workers: WorkersConfig = Field(default=WorkersConfig(), description="Prefect workers' heartbeats")
    compute: ComputeConfig = Field(default=ComputeConfig(), description="the machine's share graft takes")
    notifications: NotificationsConfig = Field(default=NotificationsConfig(), description="where run outcomes go")

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
            out[name] = parse(StageOptions, {**asdict(default), **(own or {})}, f"stages.{name}", CONFIG_FILE)
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
    types = {name: f.annotation for name, f in ProjectConfig.__pydantic_fields__.items()}  # type: ignore[attr-defined]
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
