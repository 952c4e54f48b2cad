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
    from flows.pipeline import stale_stages

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
    # `graft pull` in another fresh clone counts what arrived: every object the remote holds.
    clone2 = tmp_path / "clone2"
    subprocess.run(["git", "clone", "-q", str(project), str(clone2)], check=True)
    assert dvc(clone2, "remote", "modify", "--local", "team", "keyfile", str(sshd.key)).returncode == 0
    pulled = remote.pull_all(clone2)
    objects = [p for p in stored if "files" in p.relative_to(sshd.home / "dvc-store").parts]
    assert pulled["fetched"] == len(objects) > 0 and pulled["changed"] >= 4, pulled  # the four stages' outputs
    assert pulled["fetched_mb"] > 0.1, pulled

    # A wrong key, an unreachable host, a full disk: the message names the remote and what
    # to do, nothing local is lost, and the run waits to be pushed.
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    assert dvc(project, "remote", "modify", "--local", "team", "keyfile", str(wrong)).returncode == 0
    state = remote.push(project, logger)
    assert not state["ok"] and "DVC remote 'team'" in state["message"] and "dvc remote modify --local team" in state["message"]
    assert (project / "data/prepared/train_x.npy").exists()

    # Unreachable (nothing listens on the port any more): the same, and the run is queued.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert dvc(project, "remote", "modify", "team", "url", sshd.url("dvc-store").replace(f":{sshd.port}", f":{closed}")).returncode == 0
    state = remote.push(project, logger)
    assert not state["ok"] and "DVC remote 'team'" in state["message"] and "reachable" in state["message"]
    assert "1 run(s) waiting to be pushed" in state["message"] and (project / "data/prepared/train_x.npy").exists()

    # Full: a directory remote on a 256 KB tmpfs (where this machine lets root mount one).
    # The queued run's directories go with their files or not at all: a manifest alone
    # would make DVC take the whole directory as pushed.
    full = tmp_path / "full-disk"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], capture_output=True).returncode == 0:
        try:
            assert dvc(project, "remote", "add", "-d", "small", str(full / "store")).returncode == 0
            state = remote.push(project, logger)
            assert not state["ok"] and "DVC remote 'small'" in state["message"], state["message"]
            assert "1 run(s) waiting to be pushed" in state["message"]
            assert not list((full / "store").rglob("*.dir"))
            assert (project / "data/prepared/train_x.npy").exists()
        finally:
            subprocess.run(["umount", str(full)], capture_output=True)


def test_an_ssh_url_source_is_read_through_dvc_and_tracked_as_a_dependency(sshd, project, tmp_path, monkeypatch):
    """`ingest.path: ssh://...`: ingest reads the images through DVC's SSH filesystem, DVC
    records the URL as the stage's dependency (a change there reruns ingest), and the data
    sensor lists the source the same way. A path that is not there fails, naming it."""
    import json
    import os
    import pwd
    import shutil

    from flows.fingerprint import fingerprint
    from graft.base.errors import GraftError
    from graft.config.params import IngestParams, load_section
    from graft.data.snapshot import check_source
    from tests.conftest import make_image_folder, write_image

    home = tmp_path / "home"  # this machine's user: the key at ssh's default place, the host known
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(sshd.key, home / ".ssh" / "id_ed25519")
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    shutil.copy(sshd.client_home / ".ssh" / "known_hosts", home / ".ssh" / "known_hosts")
    monkeypatch.setenv("HOME", str(home))
    images = make_image_folder(sshd.home / "images", classes=("cat", "dog"), per_class=11)
    owner = pwd.getpwnam(sshd.user)
    for p in [images, *images.rglob("*")]:
        os.chown(p, owner.pw_uid, owner.pw_gid)
    url = sshd.url("images")
    set_params(project, ingest={"source": "imagefolder", "path": url, "max_train_per_class": None})

    before = fingerprint(project)
    assert before["files"] == 22 and "error" not in before
    res = dvc(project, "repro", "ingest", check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    manifest = (project / "data/raw/manifest.csv").read_text().splitlines()
    assert len(manifest) == 23 and any(",cat/img_000.jpg," in row for row in manifest)
    assert json.loads((project / "data/raw/classes.json").read_text()) == ["cat", "dog"]
    import yaml

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert any(d["path"] == url for d in lock["stages"]["ingest"]["deps"])
    assert "ingest" not in dvc(project, "status", "ingest").stdout

    # A new image at the source: DVC sees the changed dependency, the sensor a new fingerprint.
    write_image(images / "dog" / "new.png", seed=999)
    os.chown(images / "dog" / "new.png", owner.pw_uid, owner.pw_gid)
    assert "changed deps" in dvc(project, "status", "ingest").stdout
    after = fingerprint(project)
    assert after["files"] == 23 and after["fingerprint"] != before["fingerprint"]

    set_params(project, ingest={"path": sshd.url("no-such-folder")})
    with pytest.raises(GraftError, match="no-such-folder: no such file or directory"):
        check_source(load_section(IngestParams, "ingest", project / "params.yaml"), project)
