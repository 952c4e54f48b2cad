"""A version registered before graft's library existed ships its code as a ``stages``
package; it must still load and predict in a process that has today's ``stages`` (the
entry modules) imported, as the register stage does when that version is the champion."""

from __future__ import annotations

import sys
import textwrap

import pandas as pd

import stages  # today's entry package, imported as in a `python -m stages.register` process
from graft.models import serving

LEGACY = {
    "__init__.py": "",
    "helper.py": "def label():\n    return 'legacy'\n",
    "serving.py": textwrap.dedent("""\
        import mlflow.pyfunc
        import pandas as pd

        class Legacy(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                from stages import helper  # a lazy import at predict time, as the old code made

                return pd.DataFrame({"class": [helper.label()] * len(model_input)})
        """),
    "serving_model.py": "import mlflow\nfrom stages.serving import Legacy\nmlflow.models.set_model(Legacy())\n",
}


def test_a_model_whose_code_is_the_old_stages_package_loads_and_predicts(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = tmp_path / "stages"
    code.mkdir()
    for name, text in LEGACY.items():
        (code / name).write_text(text)
    today = sys.modules["stages"]
    monkeypatch.setattr(today, "__path__", list(today.__path__))  # the loader extends it; put it back after
    # logged as the old graft logged it: in a process whose `stages` was that package
    monkeypatch.delitem(sys.modules, "stages")
    monkeypatch.syspath_prepend(str(tmp_path))
    mlflow.set_experiment(experiment_name="legacy")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code / "serving_model.py"),
                                       code_paths=[str(code)], pip_requirements=["mlflow"])  # fmt: skip
    for name in [m for m in sys.modules if m == "stages" or m.startswith("stages.")]:
        del sys.modules[name]
    sys.modules["stages"] = today
    sys.path.remove(str(tmp_path))

    model = serving.load_registered(info.model_uri)
    assert list(model.predict(pd.DataFrame({"x": [1, 2]}))["class"]) == ["legacy", "legacy"]
    assert sys.modules["stages"] is today  # today's package is back for the stage that loaded it
    assert stages.__file__ == today.__file__
