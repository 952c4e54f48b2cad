"""The registered model: a pyfunc that predicts from raw samples.

It encodes with the modality's ``Encoder`` (images: decoded and resized; texts:
tokenized with the tokenizer saved beside the weights) and feeds the model with
:func:`stages.modeling.to_input`, the very code training used, so serving cannot drift
from training. Input: a DataFrame with the modality's column: ``image`` (encoded image
bytes: PNG, JPEG, BMP, WebP; base64 over JSON) or ``text`` (strings). Output: one row per
sample with the predicted ``class``, its ``probability``, and one ``p_<class>`` column
per class.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

MODEL_ARTIFACT = "model_dir"


class GraftClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from stages import modeling

        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        self.model, self.cfg = modeling.load(model_dir, modeling.resolve_device("cpu"))
        self.encoder = self.cfg.kind.Encoder(self.cfg.input, model_dir / modeling.ASSETS)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from stages import modeling

        cfg, column = self.cfg, self.cfg.kind.INPUT_COLUMN
        if column not in model_input:
            raise ValueError(f"input needs a column '{column}' ({cfg.modality} model)")
        batch = self.encoder.batch(list(model_input[column]))
        probs = modeling.predict_proba(self.model, batch, cfg)
        best = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
        out = pd.DataFrame({"class": [cfg.classes[i] for i in best], "probability": probs[np.arange(len(best)), best]})
        for i, c in enumerate(cfg.classes):
            out[f"p_{c}"] = probs[:, i]
        return out
