"""`graft run` refuses bad input before anything starts, with a message naming the key
and exit code 2, and leaves params.yaml as it was. In-process (Typer's runner): a
refusal happens before Prefect, DVC or torch would be imported. (Its output on a whole
run, and on bad data found by validate, is checked on the shared servers' run:
tests/integration/test_shared_servers.py.)"""

from typer.testing import CliRunner

from flows.cli import app


def graft_run(project, *args):
    return CliRunner().invoke(app, ["run", "--project", str(project), *args], prog_name="graft")


def test_bad_input_fails_before_anything_starts(project):
    params = (project / "params.yaml").read_text()
    res = graft_run(project, "--set", "ingest.source=imagefolder", "--set", "ingest.path=/no/such/images")
    assert res.exit_code == 2
    assert "ingest.path: /no/such/images: no such directory" in res.output and "graft run --set ingest.path" in res.output
    assert "Errno 2" not in res.output and not (project / "data" / "raw").exists()
    res = graft_run(project, "--concurrency", "later")
    assert res.exit_code == 2 and "'later' is not one of" in res.output
    res = graft_run(project, "--set", "fine_tune.lr=fast")
    assert res.exit_code == 2 and "fine_tune.lr: expected a number, got 'fast'" in res.output
    res = graft_run(project, "--set", "register.min_improvement=-0.01")
    assert res.exit_code == 2 and "register.min_improvement has an invalid value: -0.01 (allowed: 0 or more)" in res.output
    # A file: backbone that is not there is found now, not when load_pretrained runs.
    res = graft_run(project, "--set", "load_pretrained.source=file:weights/nope.pt")
    assert res.exit_code == 2 and "load_pretrained.source file:weights/nope.pt:" in res.output, res.output
    assert "does not exist" in res.output
    assert (project / "params.yaml").read_text() == params  # nothing refused was written
    # graft.yaml is checked up front too, even when nothing would run: a misspelt key is refused
    (project / "graft.yaml").write_text((project / "graft.yaml").read_text().replace("servers:\n", "servers:\n  mlfow: {port: 5001}\n", 1))
    res = graft_run(project)
    assert res.exit_code == 2 and "graft.yaml: unknown key(s) servers.mlfow" in res.output


def test_symbolic_link_loops_and_broken_links_are_named(project, tmp_path):
    """DVC hashes the source folder before any stage: a link loop crashed it with a
    traceback, and a folder linked to its parent was skipped without a word."""
    import os

    from tests.conftest import make_image_folder

    src = make_image_folder(tmp_path / "imgs", classes=("bird", "dog"), per_class=3, splits=True)
    os.symlink("selfloop.png", src / "train" / "bird" / "selfloop.png")
    os.symlink("..", src / "train" / "dog" / "loopdir")
    os.symlink("gone.png", src / "test" / "dog" / "broken.png")
    res = graft_run(project, "--set", "ingest.source=imagefolder", "--set", f"ingest.path={src}")
    assert res.exit_code == 2, res.output
    assert "3 symbolic link(s) that cannot be read as files" in res.output
    assert "train/bird/selfloop.png: a symbolic link loop" in res.output
    assert "train/dog/loopdir: a folder link to its own parent" in res.output
    assert "test/dog/broken.png: a broken symbolic link" in res.output
    assert "Traceback" not in res.output
