"""The registered model's definition in MLflow's models-from-code form.

MLflow executes this file when it logs or loads the model; ``set_model`` names the
object to serve. It is the one module in ``stages`` that does work at import time, by
MLflow's design, and only MLflow imports it.
"""

import mlflow

from graft.models.serving import GraftClassifier

mlflow.models.set_model(GraftClassifier())
