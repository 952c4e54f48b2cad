"""The registered model: a pyfunc that predicts from raw encoded images.

It decodes and resizes with :mod:`stages.images` and normalises with
:func:`stages.modeling.to_input`, the very functions training used, so serving cannot
drift from training. Input: a DataFrame with a column ``image`` of encoded image bytes
(PNG, JPEG, BMP, WebP). Output: one row per image with the predicted ``class``, its
``probability``, and one ``p_<class>`` column per class.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

MODEL_ARTIFACT = "model_dir"
INPUT_COLUMN = "image"


def _as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # JSON transports (the REST scoring server) send base64
        return base64.b64decode(value)
    raise TypeError(f"column '{INPUT_COLUMN}' must hold encoded image bytes, got {type(value).__name__}")


class GraftImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from stages import modeling

        self.model, self.cfg = modeling.load(Path(context.artifacts[MODEL_ARTIFACT]), modeling.resolve_device("cpu"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from stages import images, modeling

        if INPUT_COLUMN not in model_input:
            raise ValueError(f"input needs a column '{INPUT_COLUMN}' of encoded image bytes")
        cfg = self.cfg
        batch = np.stack(
            [images.load_rgb_array(_as_bytes(v), cfg.image_size, cfg.interpolation, cfg.resize) for v in model_input[INPUT_COLUMN]]
        ) if len(model_input) else np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)
        probs = modeling.predict_proba(self.model, batch, cfg)
        best = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
        out = pd.DataFrame({"class": [cfg.classes[i] for i in best], "probability": probs[np.arange(len(best)), best]})
        for i, c in enumerate(cfg.classes):
            out[f"p_{c}"] = probs[:, i]
        return out
