"""How the C heap serves torch on CPU: memory a batch frees is kept for the next batch.

torch's CPU tensors come from the C library's ``malloc``. glibc's defaults serve large
blocks with ``mmap`` (above 128 KiB, a threshold it raises only as such blocks are freed)
and hand the top of the heap back to the kernel once more than twice that is free. A
network allocates and frees its activations on every batch, so every batch faults the
same memory in again, and the kernel zeroes each page first. Measured here (AMD EPYC, 2
vCPUs; ``benchmarks/machine.py``): the fine-tuned EfficientNet-Lite0's forward pass on
batches of 64 images at 64 px ran 725 images/s with glibc's defaults and 1180 with memory
kept (1.6x; at batch 256, 580 ms a batch against 390). That is inference as `evaluate`,
the promotion gate and a model server run it; a training's own frees of large blocks
raise glibc's threshold by themselves, and its speed did not measurably change.
PyTorch's CPU tuning guide gets the same from preloading jemalloc or tcmalloc; graft
asks glibc itself (``mallopt``), so nothing needs installing or preloading.

The cost: memory freed after a peak stays with the process (its resident size does not
shrink back), which neither a stage, a short process, nor a model server minds.

Left as it is: where ``malloc`` is not glibc's (macOS, musl, an allocator preloaded with
``LD_PRELOAD``), where the user tuned glibc's malloc already (``MALLOC_TRIM_THRESHOLD_`` and its
siblings, or ``GLIBC_TUNABLES``), and with ``GRAFT_ALLOCATOR=default`` in the environment.
"""

from __future__ import annotations

import ctypes
import os

OFF_ENV = "GRAFT_ALLOCATOR"  # "default": leave malloc as it is
# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit: blocks up to this come from the heap
TRIM_THRESHOLD = 1 << 30  # free heap top kept before any goes back to the kernel
TOP_PAD = 64 << 20  # heap grown in steps of this much beyond a request: fewer brk calls

_USER_KNOBS = ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")  # a user's own, left as set
_state: str | None = None  # what tune() found, once per process


def tune() -> str:
    """Set glibc's malloc to keep what it frees (once per process), and say what was
    done: ``tuned``, or why it was left alone."""
    global _state
    if _state is None:
        _state = _tune()
    return _state


def _tune() -> str:
    if os.environ.get(OFF_ENV, "").strip().lower() == "default":
        return f"left alone ({OFF_ENV}=default)"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(f"MALLOC_{k.upper()}_" in os.environ or f"glibc.malloc.{k}" in tunables for k in _USER_KNOBS):
        return "left alone (tuned in the environment)"
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "left alone (another allocator is preloaded)"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (AttributeError, OSError):
        return "left alone (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))  # fmt: skip
    return "tuned" if ok else "left alone (mallopt refused)"
