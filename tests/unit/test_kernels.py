"""graft/base/kernels.py: a run's CPU kernel level is pinned on a CPU that has more, never
raised, and the environment it gives is one torch honours."""

from __future__ import annotations

import os
import subprocess
import sys

from graft.base import kernels


def test_a_lower_recorded_level_is_pinned_for_both_libraries():
    assert kernels.pin_env("AVX2", "AVX512") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert kernels.pin_env("DEFAULT", "AVX2") == {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def test_nothing_is_pinned_when_equal_higher_unknown_or_unrecorded():
    assert kernels.pin_env("AVX512", "AVX512") == {}
    assert kernels.pin_env("AVX512", "AVX2") == {}  # a ceiling cannot add instructions the CPU lacks
    assert kernels.pin_env(None, "AVX2") == {}  # trained before the level was recorded
    assert kernels.pin_env("SVE256", "DEFAULT") == {}  # not an x86 level


def test_torch_runs_the_pinned_level_in_a_new_process():
    here = kernels.current()
    env = {**os.environ, **kernels.pin_env("DEFAULT", here)}
    out = subprocess.run([sys.executable, "-c", "from graft.base import kernels; print(kernels.current())"],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    # On x86 the pin takes torch down to its portable kernels; elsewhere nothing is pinned.
    assert out.stdout.strip() == ("DEFAULT" if here in kernels.LEVELS else here)
