"""The registered model: a pyfunc that predicts from raw samples.

It encodes with the modality's ``Encoder`` (images: decoded and resized; texts:
tokenized with the tokenizer saved beside the weights) and feeds the model with
:func:`graft.models.modeling.to_input`, the very code training used, so serving cannot drift
from training. Input: a DataFrame with the modality's column: ``image`` (encoded image
bytes: PNG, JPEG, BMP, WebP; base64 over JSON) or ``text`` (strings). Output: one row per
sample with the predicted ``class``, its ``probability``, and one ``p_<class>`` column
per class. Param ``tta``: the test-time augmentation, by default the one the model was
trained to ship with (``fine_tune.tta``); ``none`` turns it off (half the cost for images).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from graft.base import allocator, kernels
from graft.models import modeling

MODEL_ARTIFACT = "model_dir"


class GraftClassifier(PythonModel):
    def load_context(self, context) -> None:
        allocator.tune()  # a served batch's activations, kept for the next: a third faster here
        kernels.thread_independent_blas()  # the same scores whatever the server's thread count
        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        self.model_dir = model_dir
        self.model, self.cfg = modeling.load(model_dir, modeling.resolve_device("cpu"))
        self.encoder = self.cfg.kind.Encoder(self.cfg.input, model_dir / modeling.ASSETS)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        cfg, column = self.cfg, self.cfg.kind.INPUT_COLUMN
        if column not in model_input:
            raise ValueError(f"input needs a column '{column}' ({cfg.modality} model)")
        tta = (params or {}).get("tta") or modeling.tta_of(cfg)
        modeling.check_tta(cfg.kind, tta, "params: tta")
        batch = self.encoder.batch(list(model_input[column]))
        probs = modeling.predict_proba(self.model, batch, cfg, tta=tta)
        best = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
        columns = {"class": [cfg.classes[i] for i in best], "probability": probs[np.arange(len(best)), best]}
        # In one constructor call: inserting the p_ columns one by one cost 3 ms a call.
        columns.update({f"p_{c}": probs[:, i] for i, c in enumerate(cfg.classes)})
        return pd.DataFrame(columns)


# What a registered model ships of the graft library (MLflow's code_paths): the folders
# its pyfunc can import, and nothing of training, the gate or the data gate.
# tests/unit/test_dvc_deps.py checks it against serving_model.py's import closure.
SERVING_CODE = ("__init__.py", "base", "config", "modalities", "models")


def serving_code(dest: Path) -> Path:
    """A copy of the library parts the pyfunc needs, as ``dest/graft``, for code_paths."""

    library = Path(__file__).resolve().parents[1]
    out = Path(dest) / library.name
    out.mkdir(parents=True)
    for name in SERVING_CODE:
        source = library / name
        if source.is_dir():
            shutil.copytree(source, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, out / name)
    return out


def load_folder(model_dir: str | Path) -> GraftClassifier:
    """A saved model folder (``models/fine_tuned``, a version's downloaded ``model_dir``)
    as the registered pyfunc serves it: the one way graft scores a folder, so evaluation,
    the promotion gate and ``graft diff`` predict exactly as serving does."""
    wrapper = GraftClassifier()
    wrapper.load_context(SimpleNamespace(artifacts={MODEL_ARTIFACT: str(model_dir)}))
    return wrapper


# Models registered before graft's library existed ship their code as a ``stages``
# package (``stages.serving``, ``stages.modeling``...), while a process running a stage
# has today's ``stages`` (the entry modules) imported. Loading such a model in that
# process would find today's package and not the model's modules.
LEGACY_PACKAGE = "stages"


def load_registered(uri: str):
    """A registered version as a pyfunc (``models:/name/3``, ``models:/name@champion``): the
    one way graft loads a registered model, so models logged by any graft version load.

    A model whose code is the pre-library ``stages`` package is loaded with today's
    ``stages`` modules set aside, then those are put back. The model's own modules stay
    registered under their names, and its code folder is searched after today's package,
    for the imports its code makes while predicting (where a name is one of today's entry
    modules, the entry module wins: old serving code imports none of them)."""
    import mlflow.pyfunc  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    local = Path(mlflow.artifacts.download_artifacts(uri))
    if not (local / "code" / LEGACY_PACKAGE / "serving.py").is_file():
        return mlflow.pyfunc.load_model(str(local))
    ours = {k: m for k, m in sys.modules.items() if k == LEGACY_PACKAGE or k.startswith(LEGACY_PACKAGE + ".")}
    for name in ours:
        del sys.modules[name]
    try:
        return mlflow.pyfunc.load_model(str(local))
    finally:
        sys.modules.update(ours)
        today = ours.get(LEGACY_PACKAGE)
        if today is not None:  # what the model imports later (at predict time) is found in its code
            today.__path__.append(str(local / "code" / LEGACY_PACKAGE))


# --- what serving costs ----------------------------------------------------------------------

LATENCY_REPEATS = 30  # single-sample calls; the median is robust to a scheduler hiccup
THROUGHPUT_BATCH = 64
THROUGHPUT_REPEATS = 3


def serving_cost(predict: Callable[[pd.DataFrame], Any], samples: pd.DataFrame) -> dict[str, float]:
    """What one prediction costs, end to end from raw samples (decode or tokenize, then
    the forward pass), as a served model pays it: the median latency of one sample at
    batch 1 (ms, after warm-up) and the throughput at batch 64 (samples/s).

    ``predict`` takes a DataFrame of raw samples (a pyfunc's ``predict``); ``samples`` is
    at least one row, repeated up to the batch size when there are fewer."""
    if samples.empty:
        raise ValueError("serving_cost needs at least one sample")
    reps = -(-THROUGHPUT_BATCH // len(samples))
    batch = pd.concat([samples] * reps, ignore_index=True).iloc[:THROUGHPUT_BATCH]
    one = batch.iloc[:1]
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        predict(one)
    times = []
    for _ in range(LATENCY_REPEATS):
        t0 = time.perf_counter()
        predict(one)
        times.append(time.perf_counter() - t0)
    predict(batch)
    t0 = time.perf_counter()
    for _ in range(THROUGHPUT_REPEATS):
        predict(batch)
    elapsed = time.perf_counter() - t0
    return {"latency_ms_b1": float(np.median(times) * 1000),
            "latency_ms_b1_p95": float(np.percentile(times, 95) * 1000),
            "throughput_b64": THROUGHPUT_BATCH * THROUGHPUT_REPEATS / elapsed}


def model_size(model_dir: Path, model) -> dict[str, float]:
    """The weights file's size (MB) and the parameter count: what shipping it costs."""
    return {"size_mb": (Path(model_dir) / modeling.WEIGHTS).stat().st_size / 1e6,
            "parameters": float(sum(p.numel() for p in model.parameters()))}
