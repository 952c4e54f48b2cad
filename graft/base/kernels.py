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

TAG = "graft.cpu_kernels"  # on the training run: ATen's level, as torch reports it
LEVELS = ("DEFAULT", "AVX2", "AVX512")  # ATen's x86 levels, lowest first
# oneDNN's name for the same ceiling: its AVX-512 without the later extensions
ONEDNN_ISA = {"DEFAULT": "SSE41", "AVX2": "AVX2", "AVX512": "AVX512_CORE"}


def current() -> str:
    """ATen's kernel level in this process (after any ceiling set in the environment)."""
    import torch  # torch: ~2 s of import, paid where a model runs

    return torch.backends.cpu.get_cpu_capability()


def pin_env(recorded: str | None, here: str) -> dict[str, str]:
    """The environment that makes a process here run ``recorded``'s kernels: empty when they
    are already the same, when this CPU has less than the recorded level (it cannot be
    raised), or when either is not an x86 level torch names."""
    if recorded == here or recorded not in LEVELS or here not in LEVELS:
        return {}
    if LEVELS.index(recorded) > LEVELS.index(here):
        return {}
    return {"ATEN_CPU_CAPABILITY": recorded.lower(), "ONEDNN_MAX_CPU_ISA": ONEDNN_ISA[recorded]}
