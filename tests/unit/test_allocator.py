"""The C allocator's setting for torch (graft/base/allocator.py), checked by what the kernel
counts: page faults of real forward passes in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graft.base import allocator

ROOT = Path(__file__).resolve().parents[2]

# A small conv net's inference, as a server runs it: 4 MiB activations allocated and freed
# on every call. Prints what tune() said and the page faults of ten calls after warm-up.
FORWARDS = """
import json, resource, sys
sys.path.insert(0, {root!r})
from graft.base import threads
import torch
sizer = threads.sizer("test")  # what every torch stage calls first
from graft.base import allocator
torch.set_num_threads(1)
net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                                torch.nn.ReLU()) for _ in range(6)]).eval()
x = torch.randn(16, 16, 64, 64)
with torch.inference_mode():
    for _ in range(3):
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        net(x)
print(json.dumps({{"state": allocator.tune(), "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


def forwards(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != allocator.OFF_ENV and not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", FORWARDS.format(root=str(ROOT))], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_tuned_process_stops_faulting_its_activations_in_again():
    tuned, default = forwards(), forwards(GRAFT_ALLOCATOR="default")
    assert tuned["state"] == "tuned"
    assert default["state"] == "left alone (GRAFT_ALLOCATOR=default)"
    # glibc's defaults hand the activations back to the kernel and fault them in again on
    # every call (about 110,000 faults here); kept, the warm calls fault nothing new.
    assert default["faults"] > 10_000, default
    assert tuned["faults"] < default["faults"] / 20, (tuned, default)


@pytest.mark.parametrize(("env", "why"), [
    ({"GRAFT_ALLOCATOR": "default"}, "GRAFT_ALLOCATOR=default"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "tuned in the environment"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "tuned in the environment"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "another allocator is preloaded"),
])  # fmt: skip
def test_a_users_own_allocator_settings_are_left_alone(monkeypatch, env, why):
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", allocator.OFF_ENV)]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(allocator, "_state", None)
    assert allocator.tune() == f"left alone ({why})"
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1")  # asked once per process: the first answer stays
    assert allocator.tune() == f"left alone ({why})"
