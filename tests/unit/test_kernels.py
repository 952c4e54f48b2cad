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


FORWARD_AT_1_AND_2 = """
import sys, numpy as np, torch
from graft.base import threads
threads.sizer("test", configured=1, training=sys.argv[1] == "training")
from graft.config.params import LoadPretrainedParams
from graft.modalities.backbone import build
from graft.models import modeling
model = build(LoadPretrainedParams("tf_efficientnet_lite0", "packaged:efficientnet_lite0"), num_classes=10, seed=0).model
cfg = modeling.ModelConfig("tf_efficientnet_lite0", [str(i) for i in range(10)], 0.2, "packaged:efficientnet_lite0", None,
                           {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize": "squash"})
x = np.random.default_rng(0).integers(0, 255, (64, 32, 32, 3)).astype(np.uint8)
out = []
for n in (1, 2):
    torch.set_num_threads(n)
    out.append(modeling.predict_proba(model, x, cfg, batch_size=64))
print(np.array_equal(out[0], out[1]))
"""


def test_forward_passes_give_the_same_bits_at_any_thread_count():
    """A forward-only stage (evaluate, the gate, drift, teach) scores the same on a busy
    machine as on an idle one: MKL in strict mode. A fresh process each: MKL reads its mode
    at its first call. A training process keeps MKL's default (its bits as before)."""

    def equal(kind: str) -> bool:
        env = {k: v for k, v in os.environ.items() if k != kernels.BLAS_ENV}
        out = subprocess.run([sys.executable, "-c", FORWARD_AT_1_AND_2, kind], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1] == "True"

    assert equal("forward")
    # The premise, on this CPU: the classifier's product at MKL's default splits by thread.
    print("without strict MKL, the same bits at 1 and 2 threads:", equal("training"))
