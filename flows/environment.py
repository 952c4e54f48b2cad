"""What a worker's environment must have to run a clone of the project: the dependencies
``pyproject.toml`` names, at the versions ``constraints.txt`` pins.

A worker's pull step runs ``graft pull --install`` in the fresh clone: it installs only
what is missing or at a version outside the clone's requirements (nothing, usually, so
the step costs a second), and never the project itself: the flow runs the clone's own
code from the clone, so two runs of different commits on one worker do not collide.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from graft.base.errors import GraftError

CONSTRAINTS = "constraints.txt"


def requirements(root: Path) -> list[str]:
    """``[project] dependencies`` of the clone's pyproject.toml."""
    path = root / "pyproject.toml"
    if not path.is_file():
        return []
    return list(tomllib.loads(path.read_text(encoding="utf-8")).get("project", {}).get("dependencies", []))


def unmet(reqs: list[str]) -> list[str]:
    """Those of ``reqs`` this environment does not satisfy (missing, or a version outside
    the specifier); requirements whose marker excludes this platform are skipped."""

    out = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(text)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            out.append(text)
    return out


def install_missing(root: Path, echo=print) -> list[str]:
    """Install, with pip and the clone's constraints, what the clone requires and this
    environment lacks; return what was installed (an empty list when nothing was)."""
    missing = unmet(requirements(root))
    if not missing:
        echo("environment: every dependency of pyproject.toml is installed")
        return []
    echo(f"environment: installing {', '.join(missing)}")
    cmd = [sys.executable, "-m", "pip", "install", "-q"]
    if (root / CONSTRAINTS).is_file():
        cmd += ["-c", str(root / CONSTRAINTS)]
    proc = subprocess.run([*cmd, *missing], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GraftError(f"pip could not install {', '.join(missing)} into {sys.prefix}:\n{proc.stderr[-2000:]}\n"
                         "Install them on this worker's environment by hand, then rerun the flow")  # fmt: skip
    return missing
