"""Credentials: where they are read from, that they never reach a command line, a state
file or graft.yaml, and that what graft shows of a URI or a webhook hides the secret."""

import logging

import pytest

from flows import services
from graft.base import secrets
from graft.base.errors import GraftError, ParamsError


@pytest.fixture(autouse=True)
def no_credentials_in_env(monkeypatch):
    for key in [*secrets.KEYS, "MLFLOW_AUTH_ADMIN_USERNAME"]:
        monkeypatch.delenv(key, raising=False)


def test_secrets_file_is_created_private_and_keeps_what_it_had(tmp_path):
    path = secrets.write_file(tmp_path, {"MLFLOW_AUTH_ADMIN_PASSWORD": "first-password"})
    assert path == tmp_path / ".graft" / "secrets.yaml" and oct(path.stat().st_mode & 0o777) == "0o600"
    secrets.write_file(tmp_path, {"GRAFT_WEBHOOK_URL": "https://hooks.example.com/T0/B0/tok"})
    assert secrets.read_file(tmp_path) == {"MLFLOW_AUTH_ADMIN_PASSWORD": "first-password",
                                           "GRAFT_WEBHOOK_URL": "https://hooks.example.com/T0/B0/tok"}  # fmt: skip
    with pytest.raises(KeyError):
        secrets.write_file(tmp_path, {"MLFLOW_PASSWORD": "x"})


def test_a_secrets_file_others_can_read_is_refused(tmp_path):
    path = secrets.write_file(tmp_path, {"MLFLOW_TRACKING_PASSWORD": "pw"})
    path.chmod(0o644)
    with pytest.raises(GraftError, match=r"readable by other users \(mode 644\): run `chmod 600"):
        secrets.read_file(tmp_path)
    path.chmod(0o600)
    path.write_text("MLFLOW_TRACKING_PASSWORD: pw\nMLFLOW_PASWORD: typo\n")
    with pytest.raises(GraftError, match="unknown key.*MLFLOW_PASWORD"):
        secrets.read_file(tmp_path)


def test_environment_wins_and_the_servers_machine_defaults_to_the_admin(tmp_path, monkeypatch):
    secrets.write_file(tmp_path, {"MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw", "PREFECT_SERVER_API_AUTH_STRING": "graft:p1"})
    creds = secrets.resolved(tmp_path)
    assert creds["MLFLOW_TRACKING_USERNAME"] == "admin" and creds["MLFLOW_TRACKING_PASSWORD"] == "admin-pw"
    assert creds["PREFECT_API_AUTH_STRING"] == "graft:p1"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alice-pw")
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "graft:p2")
    creds = secrets.resolved(tmp_path)
    assert (creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "alice-pw")
    assert creds["PREFECT_API_AUTH_STRING"] == "graft:p2"


def test_masking_hides_passwords_and_webhook_tokens():
    assert secrets.mask_url("postgresql://graft:s3cr%40t@db:5432/mlflow") == "postgresql://graft:***@db:5432/mlflow"
    assert secrets.mask_url("see https://u:p@h/x and sqlite:////tmp/a.db") == "see https://u:***@h/x and sqlite:////tmp/a.db"
    assert secrets.mask_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # a port is not a password
    assert secrets.url_host("https://hooks.slack.com/services/T0/B0/XyZ?x=1") == "https://hooks.slack.com/..."
    assert secrets.url_host("http://127.0.0.1:9/a/b") == "http://127.0.0.1:9/..."
    assert "tok" not in secrets.redact("<urlopen error for http://h/svc/tok>", ["http://h/svc/tok"])


def test_a_password_in_graft_yaml_is_refused(tmp_path):
    (tmp_path / "graft.yaml").write_text("servers:\n  mlflow: {backend_store_uri: 'postgresql://graft:hunter2@db/mlflow'}\n")
    with pytest.raises(GraftError, match="holds a password, and graft.yaml is in git") as err:
        services.server_config(tmp_path)
    assert "hunter2" not in str(err.value)


def test_servers_beyond_loopback_refuse_to_start_without_credentials(tmp_path):
    with pytest.raises(GraftError, match="refusing to start the servers without authentication") as err:
        services.start(tmp_path, host="0.0.0.0")
    assert "servers.prefect.host is 0.0.0.0" in str(err.value) and "graft server init-auth" in str(err.value)
    assert not (tmp_path / ".graft" / "servers").exists()  # nothing was started or written
    (tmp_path / "graft.yaml").write_text("servers:\n  auth: true\n")
    with pytest.raises(GraftError, match="servers.auth is true"):
        services.start(tmp_path)
    (tmp_path / "graft.yaml").write_text("servers:\n  auth: 'yes please'\n")
    with pytest.raises(ParamsError, match="graft.yaml: servers.auth: expected true or false"):
        services.start(tmp_path)


def test_server_commands_carry_no_secret_on_their_command_line(tmp_path, monkeypatch):
    store = "postgresql://graft:pg-password-1@db:5432/mlflow"
    secrets.write_file(tmp_path, {"MLFLOW_BACKEND_STORE_URI": store, "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
                                  "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-1", "PREFECT_SERVER_API_AUTH_STRING": "graft:pf-1"})  # fmt: skip
    prefect, mlflow_ = services.server_config(tmp_path, host="0.0.0.0")
    creds = services.check_auth(tmp_path, prefect, mlflow_)
    specs = services.commands(tmp_path, prefect, mlflow_, creds)
    argv = " ".join(specs["mlflow"]["cmd"] + specs["prefect"]["cmd"])
    for secret in ("pg-password-1", "admin-password-1", "csrf-key-1", "pf-1"):
        assert secret not in argv
    assert "--app-name basic-auth" in argv and "--backend-store-uri" not in argv
    assert specs["mlflow"]["env"]["MLFLOW_BACKEND_STORE_URI"] == store  # through the environment
    assert specs["mlflow"]["store"] == "postgresql://graft:***@db:5432/mlflow"  # what the state file keeps
    assert specs["prefect"]["env"]["PREFECT_SERVER_API_AUTH_STRING"] == "graft:pf-1"
    ini = (tmp_path / ".graft" / "mlflow" / "basic_auth.ini").read_text()
    assert "admin-password-1" not in ini and "default_permission = READ" in ini
    # Loopback, no servers.auth: no credentials asked, none needed.
    assert services.check_auth(tmp_path, *services.server_config(tmp_path)) == {}


def test_a_failing_webhook_is_logged_by_its_host_only(tmp_path, monkeypatch, caplog):
    from flows.notify import notify

    monkeypatch.setenv("GRAFT_WEBHOOK_URL", "http://127.0.0.1:9/services/T0/B0/secret-token")
    with caplog.at_level(logging.INFO, logger="graft.notify"):
        assert notify(tmp_path, "run_failed", {"stage": "x"}) is False
    assert "graft notification to http://127.0.0.1:9/... failed" in caplog.text
    assert "secret-token" not in caplog.text
    (tmp_path / "graft.yaml").write_text("notifications:\n  webhook_url: https://hooks.example.com/old-token\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="graft.notify"):
        notify(tmp_path, "promoted", {"version": "1"})
    assert "notifications.webhook_url is not used" in caplog.text and "old-token" not in caplog.text
