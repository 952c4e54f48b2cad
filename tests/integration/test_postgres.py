"""The MLflow tracking server on PostgreSQL: runs and the registry (aliases with graft's
history) work as on SQLite. PostgreSQL is Debian's, started by the test on loopback."""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.integration.test_services import free_port

pytestmark = pytest.mark.slow

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
needs_pg = pytest.mark.skipif(not PG_BIN, reason="PostgreSQL server binaries not installed (apt-get install postgresql)")


def as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the 'postgres' user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture
def postgres():
    bin_dir = Path(PG_BIN[-1])
    base = Path(tempfile.mkdtemp(prefix="graft-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chmod(base, 0o755)
        for p in (base, sock):
            os.chown(p, pg.pw_uid, pg.pw_gid)
    port = free_port()
    subprocess.run(as_pg_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]),
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(as_pg_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start",
                               "-o", f"-h 127.0.0.1 -p {port} -k {sock}"]), check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run(as_pg_user([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"]),
                       check=True, capture_output=True)  # fmt: skip
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_pg_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@needs_pg
def test_mlflow_server_on_postgres(project, postgres, tmp_path, monkeypatch):
    """graft's own register stage (its pyfunc, the gate, the alias history) against a
    tracking server whose store is PostgreSQL."""
    import mlflow
    import numpy as np

    from flows import services
    from stages import registry
    from stages.register import RegisterParams, load_test_images, register
    from tests.integration.test_register import build_candidate
    from tests.integration.test_services import set_config

    model_dir, raw, prepared = build_candidate(tmp_path)
    set_config(project, servers={"prefect": {"port": free_port()},
                                 "mlflow": {"port": free_port(), "backend_store_uri": postgres}})  # fmt: skip
    started = services.start(project)
    previous_uri = mlflow.get_tracking_uri()
    try:
        assert started["mlflow"]["store"] == postgres
        url = started["mlflow"]["url"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        client = mlflow.MlflowClient(tracking_uri=url)
        exp = client.create_experiment("pg-check")
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_metric("accuracy", 0.5)
        params = RegisterParams(model_name="pg-model", min_accuracy=0.0, min_improvement=0.0)
        first, v1 = register(model_dir, raw, prepared, params, run.info.run_id, {"git_commit": "abc"}, {"accuracy": 0.5})
        second, v2 = register(model_dir, raw, prepared, params, run.info.run_id, {"git_commit": "abc"}, {"accuracy": 0.5})
        assert first.promote and (v1, v2) == ("1", "2")
        # The same network twice: equal accuracy on the same images, the gate's paired test included.
        assert second.candidate_accuracy == second.champion_accuracy == first.candidate_accuracy
        champion = "2" if second.promote else "1"
        assert str(registry.alias_version(client, "pg-model", "champion").version) == champion
        assert [h["to_version"] for h in registry.history(client, "pg-model")][0] == "1"
        assert client.get_model_version("pg-model", "1").tags["git_commit"] == "abc"
        encoded, truth = load_test_images(raw, prepared)
        import pandas as pd

        served = mlflow.pyfunc.load_model("models:/pg-model@champion").predict(pd.DataFrame({"image": encoded}))
        accuracy = float(np.mean(served["class"].to_numpy() == np.asarray(truth)))
        assert accuracy == pytest.approx(first.candidate_accuracy)
    finally:
        services.stop(project)
        mlflow.set_tracking_uri(previous_uri)
    # The data really lives in PostgreSQL: the registry is there after the server is gone.
    out = subprocess.run(as_pg_user(["psql", postgres, "-tAc", "select count(*) from model_versions"]),
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "2"
