"""``graft.yaml``: how graft runs (Prefect task options per stage, and later services),
parsed into typed sections like params.yaml."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from graft.config.params import ParamsError, parse

CONFIG_FILE = "graft.yaml"


@dataclass(frozen=True)
class StageOptions:
    retries: int = 0
    retry_delay_seconds: float = 5.0
    timeout_seconds: float | None = 3600.0


def read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


def stage_options(root: Path, stage: str) -> StageOptions:
    """The ``default`` options overlaid with the stage's own."""
    section = read_config(root).get("stages", {}) or {}
    default = parse(StageOptions, section.get("default", {}) or {}, "stages.default")
    own = section.get(stage) or {}
    merged = {**default.__dict__, **own}
    return replace(parse(StageOptions, merged, f"stages.{stage}"))
