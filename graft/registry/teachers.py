"""Teachers from the registry or a folder, for the ``teach`` stage: every way a reference
can fail to load is a GraftError naming it (``distill.teacher`` in params.yaml)."""

from __future__ import annotations

from pathlib import Path

from graft.base.errors import GraftError
from graft.config.params import parse_reference
from graft.models import modeling
from graft.registry import rules as registry
from graft.tracking import runs as tracking
from graft.training.teacher import Teacher


def load_teacher(ref: str, model_name: str) -> Teacher:
    """Load one teacher; every way it can fail is a GraftError naming the reference."""
    where = parse_reference(ref, model_name)
    if isinstance(where, Path):
        try:
            model, cfg = modeling.load(where)
            encoder = cfg.kind.Encoder(cfg.input, where / modeling.ASSETS)
        except GraftError as e:
            raise GraftError(f"distill.teacher: {ref}: {e}") from None
        except Exception as e:
            raise GraftError(f"distill.teacher: {ref}: the model cannot be loaded ({type(e).__name__}: {e}); "
                             "is it a complete graft model directory, saved by this graft?") from None  # fmt: skip
        return Teacher(ref, model, cfg, encoder, where, {"model_dir": str(where.resolve())})
    return _load_registered(ref, *where)


def _load_registered(ref: str, name: str, kind: str, value: str) -> Teacher:
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read
    from mlflow.exceptions import MlflowException  # MLflow: imported where used

    tracking.configure()
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, value) if kind == "alias" else client.get_model_version(name, value)
    except MlflowException as e:
        what = f"no version with alias '{value}'" if kind == "alias" else f"no version {value}"
        raise GraftError(f"distill.teacher: '{ref}': registered model '{name}' has {what} "
                         f"({e.error_code}). `graft status` lists the versions and aliases.") from None  # fmt: skip
    if mv.tags.get(registry.STATE_TAG) == "pending":
        raise GraftError(f"distill.teacher: '{ref}': {name} v{mv.version} is still being registered "
                         "(or its registration was interrupted); pick another version") from None  # fmt: skip
    uri = f"models:/{name}/{mv.version}"
    from graft.models import serving  # mlflow.pyfunc: 1.5 to 2 s of import, only when a model is loaded

    try:
        wrapper = serving.load_registered(uri).unwrap_python_model()
        model, cfg, encoder, model_dir = wrapper.model, wrapper.cfg, wrapper.encoder, wrapper.model_dir
    except Exception as e:
        raise GraftError(f"distill.teacher: '{ref}': {uri} cannot be loaded ({type(e).__name__}: {e})") from None
    lineage = {"model_name": name, "version": str(mv.version), "run_id": mv.run_id,
               "training_run_id": mv.tags.get("training_run_id") or mv.run_id}  # fmt: skip
    return Teacher(ref, model, cfg, encoder, model_dir, lineage)
