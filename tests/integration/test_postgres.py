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
def test_mlflow_server_on_postgres(project, postgres, tmp_path):
    import mlflow
    import pandas as pd

    from flows import services
    from stages import registry
    from tests.integration.test_services import set_config

    set_config(project, servers={"prefect": {"port": free_port()},
                                 "mlflow": {"port": free_port(), "backend_store_uri": postgres}})  # fmt: skip
    started = services.start(project)
    previous_uri = mlflow.get_tracking_uri()
    try:
        assert started["mlflow"]["store"] == postgres
        client = mlflow.MlflowClient(tracking_uri=started["mlflow"]["url"])
        mlflow.set_tracking_uri(started["mlflow"]["url"])
        exp = client.create_experiment("pg-check")

        class Echo(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return model_input

        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_metric("accuracy", 0.5)
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), input_example=pd.DataFrame({"x": [1, 2]}),
                                           pip_requirements=["mlflow"])  # fmt: skip
        client.create_registered_model("pg-model")
        versions = [client.create_model_version("pg-model", info.model_uri, run_id=run.info.run_id, model_id=info.model_id).version
                    for _ in range(2)]
        registry.move_alias(client, "pg-model", "champion", str(versions[0]), "first")
        registry.move_alias(client, "pg-model", "champion", str(versions[1]), "better")
        assert str(client.get_model_version_by_alias("pg-model", "champion").version) == str(versions[1])
        assert [h["to_version"] for h in registry.history(client, "pg-model")] == [str(v) for v in versions]
        assert client.get_run(run.info.run_id).data.metrics["accuracy"] == 0.5
        loaded = mlflow.pyfunc.load_model("models:/pg-model@champion")
        assert loaded.predict(pd.DataFrame({"x": [3]}))["x"].tolist() == [3]
    finally:
        services.stop(project)
        mlflow.set_tracking_uri(previous_uri)
    # The data really lives in PostgreSQL: the registry is there after the server is gone.
    out = subprocess.run(as_pg_user(["psql", postgres, "-tAc", "select count(*) from model_versions"]),
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "2"
