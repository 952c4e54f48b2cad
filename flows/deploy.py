"""Deployments of graft's flows: the cron schedules from graft.yaml, served in-process
(``graft serve``) or run by a Prefect worker from a work pool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flows.config import read_config
from stages.config import parse


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    overrides: tuple[str, ...] = ()
    concurrency: Literal["skip", "wait"] = "skip"


@dataclass(frozen=True)
class SensorConfig:
    cron: str = "*/30 * * * *"


def schedule_config(root: Path) -> tuple[ScheduleConfig, SensorConfig]:
    cfg = read_config(root)
    return (parse(ScheduleConfig, cfg.get("schedule") or {}, "schedule"),
            parse(SensorConfig, cfg.get("sensor") or {}, "sensor"))  # fmt: skip


def deployment_names(root: Path) -> tuple[str, str]:
    """Per-project names, so several projects can share one Prefect server."""
    return f"{root.name}-retrain", f"{root.name}-sensor"


def deployments(root: Path, sensor: bool = True):
    """The RunnerDeployments (training on ``schedule.cron``, the sensor on ``sensor.cron``).
    ``concurrency_limit=1`` makes Prefect itself queue a second run of the same deployment."""
    from prefect.schedules import Cron

    from flows.sensor import data_sensor
    from flows.training import training_pipeline

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
            tags=["graft"],
        )
    ]
    if sensor:
        out.append(
            data_sensor.to_deployment(
                name=sensor_name,
                schedule=Cron(sens.cron, timezone=sched.timezone),
                parameters={"project_dir": str(root), "concurrency": sched.concurrency},
                concurrency_limit=1,
                description=f"Retrain graft project {root} when its data source changes",
                tags=["graft"],
            )
        )
    return out
