"""A DVC remote over SSH, the real network remote: dvc-ssh against an sshd on loopback.
(The directory remote, a fresh clone restoring from it and a failed push are covered in
test_flow_registry, on the project that test already trains.)"""

import subprocess

import pytest

from tests.conftest import dvc, requires_fashion_mnist, set_params
from tests.integration.test_flow_registry import GIT, TINY, files_under

pytestmark = [pytest.mark.slow, requires_fashion_mnist]


def test_an_ssh_remote_carries_the_bytes_through_a_real_sshd(sshd, project, tmp_path, monkeypatch):
    """DVC over SSH (dvc-ssh) to an sshd on loopback with key authentication: graft's push
    writes into the remote user's home (the files are that user's: sshd wrote them), and
    a fresh clone pulls every stage that ran back from it."""
    import logging
    import pwd

    from flows import remote
    from flows.training import stale_stages

    monkeypatch.setenv("HOME", str(sshd.client_home))  # its known_hosts trusts the test server
    set_params(project, **TINY)
    res = dvc(project, "repro", "load_pretrained", check=False)  # ingest to load_pretrained: no training
    assert res.returncode == 0, res.stderr[-2000:]
    assert dvc(project, "remote", "add", "-d", "team", sshd.url("dvc-store")).returncode == 0
    assert dvc(project, "remote", "modify", "--local", "team", "keyfile", str(sshd.key)).returncode == 0
    logger = logging.getLogger("test_remote")
    state = remote.push(project, logger)
    assert state["ok"], state["message"]
    stored = files_under(sshd.home / "dvc-store")
    assert stored and {p.stat().st_uid for p in stored} == {pwd.getpwnam(sshd.user).pw_uid}

    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", "prepared"], cwd=project, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / ".dvc/config.local").exists()  # the credentials stay on the machine that set them
    assert dvc(clone, "remote", "modify", "--local", "team", "keyfile", str(sshd.key)).returncode == 0
    restored = remote.pull(clone, stale_stages(clone), logger)
    assert set(restored) == {"ingest", "validate", "preprocess", "load_pretrained"}
    assert (clone / "data/prepared/train_x.npy").read_bytes() == (project / "data/prepared/train_x.npy").read_bytes()

    # A wrong key: the message names the remote and what to do, and nothing local is lost.
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    assert dvc(project, "remote", "modify", "--local", "team", "keyfile", str(wrong)).returncode == 0
    state = remote.push(project, logger)
    assert not state["ok"] and "DVC remote 'team'" in state["message"] and "dvc remote modify --local team" in state["message"]
    assert (project / "data/prepared/train_x.npy").exists()
