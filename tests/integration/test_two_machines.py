"""Two machines on one: machine A serves (Prefect and MLflow servers on loopback) and
schedules; machine B runs only a Prefect process worker. They share nothing but a bare
git repository (the code), a DVC remote over SSH (a real sshd) and the two servers:
each has its own HOME, its own DVC cache and its own working directory."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import committed, copy_project, requires_fashion_mnist, set_params
from tests.integration.conftest import kill_all
from tests.integration.test_flow_registry import TINY
from tests.integration.test_services import free_port, set_config

pytestmark = [pytest.mark.slow, requires_fashion_mnist]
BIN = Path(sys.executable).parent
POOL = "team-pool"


def machine(base: Path, name: str, sshd) -> SimpleNamespace:
    """A HOME with the SSH key and known_hosts of the DVC remote, a DVC cache directory
    (DVC's global config, under that HOME), and an environment that names only them."""
    home = base / name / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(sshd.key, home / ".ssh" / "id_ed25519")  # the default key name: nothing to configure
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    shutil.copy(sshd.client_home / ".ssh" / "known_hosts", home / ".ssh" / "known_hosts")
    keep = ("LANG", "LC_ALL", "TMPDIR", "USER", "LOGNAME", "GRAFT_THREADS")  # the suite's thread count (tests/conftest.py)
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TQDM_MININTERVAL="5", GIT_AUTHOR_NAME=name,
               GIT_AUTHOR_EMAIL=f"{name}@example.com", GIT_COMMITTER_NAME=name, GIT_COMMITTER_EMAIL=f"{name}@example.com",
               DVC_SITE_CACHE_DIR=str(base / name / "dvc-site-cache"), PREFECT_HOME=str(home / ".prefect"))  # fmt: skip
    m = SimpleNamespace(name=name, home=home, dir=base / name, env=env, cache=base / name / "dvc-cache")
    sh(m, sys.executable, "-m", "dvc", "config", "--global", "cache.dir", str(m.cache))
    return m


def sh(m, *cmd, cwd=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=cwd or m.dir, env=m.env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{m.name}: {' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def graft(m, *args, cwd, check=True) -> subprocess.CompletedProcess:
    return sh(m, sys.executable, "-m", "flows.cli", *args, cwd=cwd, check=check)


def api(url: str, method: str = "GET", body: dict | None = None, tries: int = 6):
    """A call to the Prefect server, retried on 503 and 429 as Prefect's own client does:
    its SQLite database is busy with its services' writes now and then on 2 cores."""
    for attempt in range(tries):
        req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code not in (429, 503) or attempt == tries - 1:
                raise
            time.sleep(2 ** attempt)


def wait_for_end(prefect_api: str, flow_run_id: str, timeout: float, worker_log: Path) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api(f"{prefect_api}/flow_runs/{flow_run_id}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(3)
    raise AssertionError(f"flow run {flow_run_id} did not end in {timeout:.0f} s; worker log:\n{worker_log.read_text()[-5000:]}")


def start_worker(m, prefect_api: str) -> tuple[subprocess.Popen, Path]:
    log = m.dir / "worker.log"
    env = {**m.env, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=m.dir, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, log


def wait_for_text(log: Path, offset: int, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            if text.encode() in f.read():
                return
        time.sleep(1)
    raise AssertionError(f"{text!r} not in {log} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def kill_machine(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and every process below it (DVC's stages run in groups of their own)."""
    import psutil

    kill_all([psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)])
    proc.wait()


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_worker_on_machine_b_retrains_what_machine_a_scheduled(sshd, tmp_path):
    a, b, c = (machine(tmp_path, n, sshd) for n in ("a", "b", "c"))
    origin = tmp_path / "origin.git"  # the team's git server
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)

    # Machine A: the project, its DVC remote over SSH (in git: .dvc/config), pushed.
    project = copy_project(a.dir / "project")
    # As the repository ships: a committed dvc.lock from a run whose outputs are on no remote.
    (project / "dvc.lock").write_text(committed("dvc.lock"))
    set_params(project, **TINY)
    set_config(project, servers={"prefect": {"port": free_port()}, "mlflow": {"port": free_port()}},
               workers={"crashed_after_seconds": 45})  # a dead worker's run is Crashed 45 s after its last heartbeat
    sh(a, sys.executable, "-m", "dvc", "remote", "add", "-d", "team", sshd.url("dvc-store"), cwd=project)
    sh(a, "git", "add", "-A", cwd=project)
    sh(a, "git", "commit", "-qm", "tiny slice, team remote", cwd=project)
    sh(a, "git", "branch", "-M", "main", cwd=project)
    sh(a, "git", "remote", "add", "origin", str(origin), cwd=project)
    sh(a, "git", "push", "-q", "-u", "origin", "main", cwd=project)
    commit = sh(a, "git", "rev-parse", "HEAD", cwd=project).stdout.strip()

    graft(a, "server", "start", cwd=project)
    worker = None
    try:
        state = {n: json.loads((project / ".graft/servers" / f"{n}.json").read_text()) for n in ("prefect", "mlflow")}
        prefect_api, mlflow_url = state["prefect"]["url"], state["mlflow"]["url"]
        out = graft(a, "schedule", "--pool", POOL, cwd=project).stdout
        assert f"work pool '{POOL}' created" in out and f"{origin} at branch main" in out, out

        # Machine B: nothing but a worker, started in an empty directory.
        b.dir.mkdir(exist_ok=True)
        worker, worker_log = start_worker(b, prefect_api)
        t0 = time.monotonic()
        run = api(f"{prefect_api}/deployments/name/graft-training/project-retrain")
        flow_run = api(f"{prefect_api}/deployments/{run['id']}/create_flow_run", "POST", {})
        ended = wait_for_end(prefect_api, flow_run["id"], 600, worker_log)
        worker_seconds = time.monotonic() - t0
        log = worker_log.read_text()
        assert ended["state_type"] == "COMPLETED", log[-6000:]
        print(f"\nworker run: {worker_seconds:.0f} s from trigger to Completed")

        # B cloned the pushed commit, pulled from the (empty) remote, trained, registered,
        # and pushed: the remote user's files hold the model now; B's working copy was
        # a temporary clone, and B's own DVC cache directory received the run's objects.
        assert any(p.is_file() for p in b.cache.rglob("*")), "B's DVC cache directory is empty"
        assert not (b.dir / "mlruns").exists() and not list(b.dir.glob("**/mlflow.db"))
        stored = [p for p in (sshd.home / "dvc-store").rglob("*") if p.is_file()]
        assert any("runs" in p.parts for p in stored) and len(stored) > 10

        # B dies mid-run (the worker and every process under it, SIGKILL, as if the machine
        # lost power): the server marks the run Crashed once its heartbeats stop, which
        # frees the deployment's slot, and a worker on another machine (D) runs the
        # deployment to the end. (Both runs restore the stages from the remote's run-cache:
        # the same commit and params; a kill mid-training is test_flow_registry's.)
        offset = worker_log.stat().st_size
        doomed = api(f"{prefect_api}/deployments/{run['id']}/create_flow_run", "POST", {})
        wait_for_text(worker_log, offset, "stages to run:", timeout=300)
        kill_machine(worker)
        worker = None
        killed = time.monotonic()

        # While the server waits for the dead run's heartbeat, machine C (a fresh clone of
        # the same commit) runs `graft run`: the stages come from the remote's run-cache,
        # nothing trains, the champion stays v1.
        sh(c, "git", "clone", "-q", str(origin), str(c.dir / "project"))
        c_run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run"], cwd=c.dir / "project", env=c.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

        # Meanwhile A sees the champion the worker registered, trained from the pushed
        # commit, its artifacts in A's server store (uploaded through the server: B never
        # saw A's disk), and `graft pull --version champion` brings its data and model.
        status = graft(a, "status", cwd=project).stdout
        assert "champion   v1" in status and "first champion" in status, status  # the gate's reason, in the alias history
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=mlflow_url)
        mv = client.get_model_version_by_alias("graft-classifier", "champion")
        trained = client.get_run(mv.run_id)
        assert trained.data.tags["mlflow.source.git.commit"] == commit
        assert trained.data.tags["prefect_flow_run_id"] == flow_run["id"]
        assert any((project / "mlruns" / "artifacts").rglob("MLmodel"))
        assert not (project / "models/fine_tuned").exists()
        out = graft(a, "pull", "--version", "champion", cwd=project).stdout
        assert "every stage is up to date" in out, out
        assert (project / "models/fine_tuned").is_dir()
        assert "up to date" in sh(a, sys.executable, "-m", "dvc", "status", cwd=project).stdout

        out, _ = c_run.communicate(timeout=600)
        assert c_run.returncode == 0, out[-4000:]
        print(out[-1500:])
        ran = next(line for line in out.splitlines() if "stages run:" in line)
        assert "fine_tune" not in ran and "ingest" not in ran and "register" not in ran, out
        assert "restored from the remote" in out or "stages restored:" in out

        # Still within the dead worker's grace period: machine D, fresh (an empty DVC cache),
        # reproduces the worker's champion from a clone: the commit from git, the data from
        # the SSH remote, the lineage from the tracking server.
        d = machine(tmp_path, "d", sshd)
        sh(d, "git", "clone", "-q", str(origin), str(d.dir / "clone"))
        rep = subprocess.run([sys.executable, "-m", "flows.cli", "reproduce", "champion"], cwd=d.dir / "clone",
                             env={**d.env, "MLFLOW_TRACKING_URI": mlflow_url}, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
        assert "pulling from the DVC remote" in rep.stdout and "graft-classifier v1: identical" in rep.stdout, rep.stdout

        ended = wait_for_end(prefect_api, doomed["id"], 240, worker_log)
        assert ended["state_type"] == "CRASHED" and "no heartbeat" in ended["state"]["message"], ended["state"]
        print(f"killed worker's run marked Crashed {time.monotonic() - killed:.0f} s after the kill (or less)")
        worker, worker_log = start_worker(d, prefect_api)
        rerun = api(f"{prefect_api}/deployments/{run['id']}/create_flow_run", "POST", {})
        ended = wait_for_end(prefect_api, rerun["id"], 600, worker_log)
        log = worker_log.read_text()
        assert ended["state_type"] == "COMPLETED", log[-6000:]
        assert "Stage 'fine_tune' is cached - skipping run" in log  # D trained nothing: B's run came back
        assert len(client.search_model_versions("name='graft-classifier'")) == 1
        doomed_runs = client.search_runs([trained.info.experiment_id], f"tags.prefect_flow_run_id = '{doomed['id']}'")
        assert doomed_runs and {r.info.status for r in doomed_runs} == {"FAILED"}
    finally:
        if worker is not None:
            stop_group(worker)
        graft(a, "server", "stop", cwd=project, check=False)
