"""Atomic outputs under a real kill -9."""

import subprocess
import sys

from graft.base import fsio

KILLED_WRITER = """
import os, signal, sys
from graft.base import fsio
with fsio.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half.npy").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_output_leaves_the_old_output_and_no_leak(tmp_path):
    out = tmp_path / "teacher"
    with fsio.atomic_dir(out) as tmp:
        (tmp / "logits.npy").write_bytes(b"complete")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True)
    assert proc.returncode == -9
    assert (out / "logits.npy").read_bytes() == b"complete" and not (out / "half.npy").exists()
    assert len(list(tmp_path.glob(".teacher.*.tmp"))) == 1  # what kill -9 leaves behind
    with fsio.atomic_dir(out) as tmp:  # the next run of the stage
        (tmp / "logits.npy").write_bytes(b"again")
    assert (out / "logits.npy").read_bytes() == b"again"
    assert list(tmp_path.glob(".teacher.*")) == []  # the killed run's folder is gone too
