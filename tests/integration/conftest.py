import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect server for the session (about 7 s to start)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def project_run_env(project, monkeypatch):
    """Point this process (the flow, the CLI) at the project copy's stores."""
    from tests.conftest import project_env

    for key, value in project_env(project).items():
        if key in ("MLFLOW_TRACKING_URI", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS", "TQDM_MININTERVAL"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return project
