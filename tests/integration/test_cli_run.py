"""`graft run` as a person runs it: bad input stops it before anything starts, with a
message and exit code 2. (Its output on a whole run, and on bad data found by validate,
is checked on the shared servers' run: tests/integration/test_shared_servers.py.)"""

import subprocess
import sys

import pytest

from tests.conftest import project_env

pytestmark = pytest.mark.slow

def graft_run(project, *args):
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--project", str(project), *args],
                          cwd=project, env=project_env(project), capture_output=True, text=True, timeout=600)  # fmt: skip


def test_bad_input_fails_before_anything_starts(project):
    res = graft_run(project, "--set", "ingest.source=imagefolder", "--set", "ingest.path=/no/such/images")
    assert res.returncode == 2
    assert "ingest.path: /no/such/images: no such directory" in res.stderr and "graft run --set ingest.path" in res.stderr
    assert "Errno 2" not in res.stdout + res.stderr and not (project / "data" / "raw").exists()
    res = graft_run(project, "--concurrency", "later")
    assert res.returncode == 2 and "'later' is not one of" in res.stderr
    res = graft_run(project, "--set", "fine_tune.lr=fast")
    assert res.returncode == 2 and "fine_tune.lr: expected a number, got 'fast'" in res.stderr
    # graft.yaml is checked up front too, even when nothing would run: a misspelt key is refused
    (project / "graft.yaml").write_text((project / "graft.yaml").read_text().replace("servers:\n", "servers:\n  mlfow: {port: 5001}\n", 1))
    res = graft_run(project)
    assert res.returncode == 2 and "graft.yaml: unknown key(s) servers.mlfow" in res.stderr
