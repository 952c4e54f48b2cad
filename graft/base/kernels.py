"""Which CPU kernels torch trains with, and how to run the same ones on another CPU.

torch picks its vectorised kernels (ATen's) and oneDNN's convolutions by the widest
instruction set the CPU has: AVX2 on one machine, AVX-512 on the next. They add up in
other orders, so the same seeded training differs in its last bits from the first step
and, a few epochs later, in its metrics: the default quick run gives 0.9150 test accuracy
with AVX2 kernels and 0.9110 with AVX-512 ones, on the same data, code and seed. Both
libraries take a ceiling from the environment (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``), so a run recorded at a lower level can be run again with the same
level's kernels on a CPU that has more (``graft reproduce`` does); the other way round it
cannot. Measured: pinned to AVX2, an AVX-512 EPYC gave the AVX2 figures (0.9150) and, bit
for bit, the weights an AVX2-only EPYC trains unpinned, but not those of earlier AVX2 machines
(same figures): the CPU model also orders the sums. So across CPU models such a rerun is
"within tolerance", "identical" only between close relatives. The thread count orders
them too (:mod:`graft.base.threads`).
"""

from __future__ import annotations

import os

TAG = "graft.cpu_kernels"  # on the training run: ATen's level, as torch reports it
TORCH_TAG = "graft.torch"  # on the training run: torch's version (its kernels change between versions)
# Intel MKL's conditional numerical reproducibility: in strict mode its matrix products
# give the same bits at any thread count (on the code path AUTO picks for this CPU).
BLAS_ENV, BLAS_STRICT = "MKL_CBWR", "AUTO,STRICT"
LEVELS = ("DEFAULT", "AVX2", "AVX512")  # ATen's x86 levels, lowest first
# oneDNN's name for the same ceiling: its AVX-512 without the later extensions
ONEDNN_ISA = {"DEFAULT": "SSE41", "AVX2": "AVX2", "AVX512": "AVX512_CORE"}


def current() -> str:
    """ATen's kernel level in this process (after any ceiling set in the environment)."""
    import torch  # torch: ~2 s of import, paid where a model runs

    return torch.backends.cpu.get_cpu_capability()


def torch_version() -> str:
    import torch  # torch: ~2 s of import, paid where a model runs

    return str(torch.__version__)


def pin_env(recorded: str | None, here: str) -> dict[str, str]:
    """The environment that makes a process here run ``recorded``'s kernels: empty when they
    are already the same, when this CPU has less than the recorded level (it cannot be
    raised), or when either is not an x86 level torch names."""
    if recorded == here or recorded not in LEVELS or here not in LEVELS:
        return {}
    if LEVELS.index(recorded) > LEVELS.index(here):
        return {}
    return {"ATEN_CPU_CAPABILITY": recorded.lower(), "ONEDNN_MAX_CPU_ISA": ONEDNN_ISA[recorded]}


def thread_independent_blas() -> None:
    """Make Intel MKL's matrix products independent of the thread count, so a forward pass
    (evaluate, the gate, drift, teach, a model server) gives the same bits on a busy machine
    as on an idle one. Without it, a classifier's product (64 x 1280 by 1280 x 10) splits
    its sums by thread and the scores' last bits follow the pool's size; with it, the
    forward passes of the image and text backbones were bit-identical at 1 and 2 threads,
    at no measurable cost. MKL reads the setting at its first call, so this runs before any
    torch work (:func:`graft.base.threads.sizer`); a value the user set is left as it is."""
    os.environ.setdefault(BLAS_ENV, BLAS_STRICT)
