"""benchmarks/gpu.py, the 224 px GPU throughput benchmark, run as a user runs it: here on
the CPU (``--device cpu``, a small size), which goes through the same code as on a GPU up
to autocast; and its refusal, with the way out, where there is no GPU."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, requires_fashion_mnist


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_without_a_gpu_it_says_so_and_how_to_run_the_same_code():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark would run")
    res = bench("--device", "cuda")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA GPU here" in res.stderr and "--device cpu" in res.stderr


@requires_fashion_mnist
def test_the_same_code_runs_on_the_cpu_and_records_both_loops(tmp_path):
    out = tmp_path / "results-gpu.json"
    res = bench("--device", "cpu", "--image-size", "32", "--images", "64", "--batch-size", "16", "--rounds", "2",
                "--json", str(out))  # one short pair of rounds: the code path, not the figures
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    t = r["throughput"]
    assert r["settings"] == {"device": "cpu", "image_size": 32, "batch_size": 16, "architecture": r["settings"]["architecture"]}
    assert t["round_images"] == 64 and len(t["graft_runs"]) == len(t["plain_runs"]) == t["rounds"]
    assert all(v > 0 for v in (*t["graft_runs"], *t["plain_runs"]))
    assert t["ratio"] == pytest.approx(t["graft_images_per_second"] / t["plain_loop_images_per_second"])
    assert r["machine"]["cpu"] and "graft_commit" in r["machine"]
    assert "fine-tune throughput at 32 px on cpu" in res.stdout
