"""`graft run` as a person runs it: a subprocess with a real temporary Prefect server,
real DVC and MLflow, on a tiny image folder. Checks what it prints and its exit codes."""

import subprocess
import sys

import pytest

from tests.conftest import make_image_folder, project_env, set_params

pytestmark = pytest.mark.slow

TINY = dict(
    preprocess={"image_size": 32},
    fine_tune={"epochs": 1, "batch_size": 16, "mode": "partial", "frozen_groups": 4},
    register={"min_accuracy": 0.0},
)


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


def test_run_prints_a_clean_summary_then_fails_clearly_on_bad_data(project, tmp_path):
    src = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=14)
    set_params(project, ingest={"source": "imagefolder", "path": str(src), "max_train_per_class": None}, **TINY)
    res = graft_run(project)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "graft run: done" in out and "registry: graft-classifier v1 is champion" in out
    # One line per thing that happened: no DVC hints per stage, no progress-bar redraws,
    # no CloudPickle warning, no artifact download bars.
    for noise in ("dvc push", "To track the changes with git", "%|", "cloudpickle", "CloudPickle", "Downloading artifacts"):
        assert noise not in out, noise
    assert out.count("stages to run: ingest, validate, preprocess, load_pretrained, fine_tune, evaluate, register") == 1

    # The source gains an empty class and a corrupt file: stop at validate, say it once.
    (src / "c").mkdir()
    (src / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    res = graft_run(project)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert out.count("a/broken.png: error=") == 1 and out.count("c: count=0") == 1
    assert "Traceback" not in out and "NoneType: None" not in out
    assert "graft run: stage 'validate' failed: bad input (exit code 2)" in out and "what to do:" in out
    assert "stages to run: ingest, validate, preprocess, load_pretrained, fine_tune, evaluate, register" in out
