"""Shared fixtures: tiny image folders written with PIL, and a project copy for
integration tests that run the real tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def pytest_configure(config):
    """The environment of every process the suite starts. `make test` runs two modules at
    once (pytest-xdist, one per core), so nothing may depend on what the other is doing."""
    # graft sizes torch's pool to the cores other processes leave free, and another thread
    # count gives other weights' last bits: trainings that tests compare bit for bit (a
    # rerun, `graft reproduce`) would depend on the other worker's load at that moment.
    os.environ.setdefault("GRAFT_THREADS", "1")
    # Prefect's temporary server (`graft run` without servers) keeps its SQLite database
    # under PREFECT_HOME: one per worker, not the user's ~/.prefect shared by both. The
    # workers inherit the controller's environment: a home made here is replaced in each.
    made = os.environ.get("GRAFT_TEST_PREFECT_HOME")
    if "PREFECT_HOME" not in os.environ or os.environ["PREFECT_HOME"] == made:
        import tempfile

        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        home = tempfile.mkdtemp(prefix=f"graft-test-prefect-{worker}-")
        os.environ["PREFECT_HOME"] = os.environ["GRAFT_TEST_PREFECT_HOME"] = home
        config._graft_prefect_home = home


# The longest modules (minutes each, measured on the 2-core CPU), started first: `make
# test` hands whole modules to its two workers in collection order, and a long one
# collected last would run on one worker while the other sits idle.
LONGEST_FIRST = ("test_ddp", "test_two_machines", "test_services", "test_flow_registry", "test_memory",
                 "test_distill", "test_shared_servers", "test_drift_gate", "test_register_faults",
                 "test_text_pipeline", "test_tracking_server_dies", "test_accuracy_guard")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    home = getattr(config, "_graft_prefect_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 16), seed: int = 0, fmt: str | None = None) -> Path:
    """A small random image; ``seed`` makes its content (and hash) distinct."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "L":
        im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    elif mode == "RGBA":
        im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB").convert("P")
    else:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
    im.save(path, format=fmt)
    return path


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 12, splits: bool = False, seed0: int = 0) -> Path:
    """A folder of class sub-folders with PNG and JPEG images of mixed modes and sizes."""
    modes = ["RGB", "L", "RGBA", "P"]
    n = seed0
    for split in (("train", "test") if splits else (None,)):
        for c in classes:
            count = per_class if split != "test" else max(2, per_class // 3)
            for i in range(count):
                n += 1
                base = root / split / c if split else root / c
                mode = modes[i % len(modes)]
                ext = ".jpg" if (i % 3 == 0 and mode in ("RGB", "L")) else ".png"
                write_image(base / f"img_{i:03d}{ext}", mode=mode, size=(16 + i % 5, 14 + i % 7), seed=n)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


# What `graft run --set`, `--preset` and a person edit in a checkout: tests take these as the
# commit holds them, so a suite's verdict depends on the commit, not on the last run here.
WORKSPACE_FILES = ("params.yaml", "graft.yaml")


def committed(rel: str) -> str:
    """A file as HEAD holds it (the working copy where the checkout is no git repository)."""
    try:
        return subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return (ROOT / rel).read_text()


@pytest.fixture(scope="session")
def committed_params(tmp_path_factory) -> Path:
    """params.yaml as committed, in a file of its own."""
    path = tmp_path_factory.mktemp("committed") / "params.yaml"
    path.write_text(committed("params.yaml"))
    return path


def project_files() -> list[str]:
    """The project's files as git sees them (tracked plus untracked, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    return [f for f in out if (ROOT / f).is_file()]


def copy_project(dest: Path) -> Path:
    """A fresh copy of the project, as a git repository with one commit (DVC needs one)."""
    for rel in project_files():
        if rel.startswith("reports/"):
            continue  # the stages' outputs: a copy starts without them, so tests see what its own run wrote
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel in WORKSPACE_FILES:
            target.write_text(committed(rel))
        else:
            shutil.copy2(ROOT / rel, target)
    # Outputs recorded in the copied lock belong to the real project's cache, not this one.
    (dest / "dvc.lock").unlink(missing_ok=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def project_env(project: Path) -> dict[str, str]:
    """Environment for running the tools inside a project copy: this venv's python first on
    PATH (dvc.yaml calls `python -m ...`), caches and stores under the copy."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(project / ".dvc" / "site-cache")
    env["PYTHONPATH"] = str(project)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["TQDM_MININTERVAL"] = "5"
    return env


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project),
        capture_output=True, text=True, check=check,
    )


def set_params(project: Path, **sections) -> None:
    """Update params.yaml sections in a project copy, e.g. ingest={"max_train_per_class": 5}."""
    import yaml

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


requires_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (make data installs the Debian package)",
)
