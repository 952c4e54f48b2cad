"""Stage ``register``: log the fine-tuned model to the MLflow registry and decide, on
the same evaluation data, whether it becomes ``champion`` or stays ``challenger``.

The candidate and the current champion are both loaded as registered pyfuncs and score
the raw test samples of this run, in this process: never a number logged on other data.
If anything fails after the model version is created, the version is deleted and the
aliases are left as they were.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from importlib import metadata
from pathlib import Path

from graft.base import fsio
from graft.base.errors import GraftError, fault_point
from graft.config.params import RegisterParams, read_params
from graft.drift import gate as drift
from graft.models import modeling
from graft.promotion import gate
from graft.registry import rules as registry
from graft.training import teacher as teach


def pip_requirements(modality) -> list[str]:
    pins = ["torch", "mlflow", "numpy", "pandas", "pyyaml", *modality.REQUIREMENTS]
    return [f"{p}=={metadata.version(p)}" for p in pins]


def params_hash(params_path: Path) -> str:
    return hashlib.sha256(json.dumps(read_params(params_path), sort_keys=True).encode()).hexdigest()[:16]


def log_candidate(model_dir: Path, example):
    """Log the fine-tuned model as a pyfunc into the active run; return its ModelInfo.

    MLflow's models-from-code form: the model is defined by ``graft/models/serving_model.py``
    and the packaged ``graft`` library, not by a pickled object, so loading it needs no
    CloudPickle and works with any compatible Python."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    from graft.models import serving  # the library module: imported where used

    example_df = example.iloc[:2].reset_index(drop=True)  # batch of 2: no batch size baked in
    artifacts = {serving.MODEL_ARTIFACT: str(model_dir)}
    wrapper = serving.load_folder(model_dir)  # only to compute the output schema here

    # The params a caller may pass at predict time, with the model's own as defaults.
    signature = mlflow.models.infer_signature(example_df, wrapper.predict(None, example_df),
                                              params={"tta": modeling.tta_of(wrapper.cfg)})  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(serving.__file__).with_name("serving_model.py")),
            artifacts=artifacts,
            code_paths=[str(serving.serving_code(Path(tmp)))],  # the library parts serving needs: self-contained
            signature=signature,
            input_example=example_df,
            pip_requirements=pip_requirements(wrapper.cfg.kind),
        )


def describe(name: str, version: str, decision: gate.Decision, metrics: dict[str, float], tags: dict[str, str]) -> str:
    """The model version's description in the registry: what it scores, on what data,
    what the gate decided, and where it came from."""
    alias = registry.CHAMPION if decision.promote else registry.CHALLENGER
    lines = [f"{name} v{version}, registered as {alias} by graft's register stage.", ""]
    if metrics:
        lines.append("Test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" on {decision.n} test samples.")
    lines.append(f"Decision: {decision.reason}.")
    if decision.champion_accuracy is not None:
        lines.append(f"Champion v{decision.champion_version} on the same samples: accuracy {decision.champion_accuracy:.4f}.")
    lines += ["", "Lineage:",
              f"- data version (DVC hash of the prepared data): {tags.get('data_version', 'unknown')}",
              f"- git commit: {tags.get('git_commit', 'unknown')} (uncommitted changes: {tags.get('git_dirty', 'unknown')})",
              f"- params hash: {tags.get('params_hash', 'unknown')}",
              f"- MLflow run: {tags.get('mlflow_run_id', 'unknown')}"]  # fmt: skip
    if tags.get("training_run_id") and tags["training_run_id"] != tags.get("mlflow_run_id"):
        lines.append(f"- trained in MLflow run {tags['training_run_id']} (model restored from DVC's cache)")
    if tags.get("graft.teacher"):
        lines.append(f"- distilled from {tags['graft.teacher']} (training run {tags.get('graft.teacher_run_id', '?')}, "
                     f"weights sha256 {tags.get('graft.teacher_weights_sha256', '?')[:16]})")
    if tags.get("graft.drift"):
        lines.append(f"- drift gate: {tags['graft.drift']}" + (f"; moved: {tags['graft.drift_moved']}" if tags.get("graft.drift_moved") else ""))
    if tags.get("prefect_flow_run_id"):
        lines.append(f"- Prefect flow run: {tags['prefect_flow_run_id']}")
    return "\n".join(lines)


def log_drift(reference: Path | None, report_dir: Path | None) -> dict[str, str]:
    """Into the active run: the drift reference of the data the model was trained on (what
    later data is tested against once it is champion) and the drift gate's report; return
    the version tags that say what the gate found."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    if reference is not None and (reference / drift.INFO).is_file():
        mlflow.log_artifacts(str(reference), drift.ARTIFACT)
    if report_dir is None or not (report_dir / drift.REPORT).is_file():
        return {}
    for name in (drift.REPORT, drift.PLOT):
        if (report_dir / name).is_file():
            mlflow.log_artifact(str(report_dir / name), drift.REPORT_ARTIFACT)
    report = fsio.read_json(report_dir / drift.REPORT)
    tags = {"graft.drift": report["verdict"]}
    if report.get("overall"):
        o = report["overall"]
        mlflow.log_metrics({"drift_p_value": o["p_value"], "drift_p_adjusted": report.get("p_adjusted_min", o["p_adjusted"]),
                            "drift_domain_auc": o["domain_auc"], "drift_mmd2": o["mmd2"]})  # fmt: skip
        tags["graft.drift"] += f" against {report['reference']['origin']} (p {o['p_value']:.4f}, AUC {o['domain_auc']:.3f})"
        if report.get("moved"):
            tags["graft.drift_moved"] = ", ".join(report["moved"])
    mlflow.set_tags(tags)
    return tags


def register(model_dir: Path, raw_dir: Path, prepared_dir: Path, params: RegisterParams, run_id: str,
             tags: dict[str, str], metrics: dict[str, float], reference: Path | None = None,
             drift_report: Path | None = None, serving_cost: dict[str, float] | None = None) -> tuple[gate.Decision, str]:  # fmt: skip
    """Log, register, score, decide and set the alias; return the decision and the version.
    ``reference`` and ``drift_report`` (the drift stage's) go along with the model;
    ``serving_cost``: the candidate's, as evaluate measured it."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    from graft.models import serving  # mlflow.pyfunc: 1.5 to 2 s of import, only when a model is loaded

    client = mlflow.MlflowClient()
    # An earlier registration killed half-way is finished or undone before this one.
    for line in registry.repair(client, params.model_name):
        print(f"register: repaired: {line}")
    samples = gate.load_test_samples(raw_dir, prepared_dir)
    identity = modeling.identity(model_dir)
    same = registry.version_of_model(client, params.model_name, identity)
    if same is not None:  # a rerun that ended with the very same model: one model, one version
        return already_registered(client, params.model_name, same, identity, run_id, metrics, len(samples)), str(same.version)
    distilled = fsio.read_json(model_dir / modeling.CONFIG).get("distilled_from")
    if distilled:  # the teachers this student learnt from, on its registry entry

        tags = {**tags, **teach.lineage_tags(distilled["teachers"])}
    with mlflow.start_run(run_id=run_id):
        info = log_candidate(model_dir, samples.head(2))
        tags = {**tags, **log_drift(reference, drift_report)}
    candidate_model = serving.load_registered(info.model_uri)
    champion = registry.alias_version(client, params.model_name, registry.CHAMPION)
    champ_model = serving.load_registered(f"models:/{params.model_name}@{registry.CHAMPION}") if champion else None
    # Serving costs as evaluate measured them: the candidate's (serving.json beside its
    # metrics), the champion's on its run. One figure per version, not a second measurement.
    comparison = gate.compare(candidate_model, champ_model, samples, params.gate,
                              str(champion.version) if champion else None,
                              (serving_cost, registry.recorded_serving(client, champion)))  # fmt: skip

    try:
        client.get_registered_model(params.model_name)
    except Exception:
        client.create_registered_model(params.model_name, description="Registered by graft's register stage.")
    # The source is the logged model (models:/m-...): its id must go along, or a tracking
    # server refuses the source. The version is pending until its alias is set: a kill
    # before that leaves it for repair() to delete.
    mv = client.create_model_version(params.model_name, info.model_uri, run_id=run_id, model_id=info.model_id,
                                     tags={**tags, registry.MODEL_TAG: identity, registry.STATE_TAG: "pending"})  # fmt: skip
    version = str(mv.version)
    fault_point("after_create")
    try:
        registry.wait_until_ready(client, params.model_name, version)
        decision = comparison.decision(params.gate, candidate_version=version)
        if decision.promote:  # the gate says champion; the server says whether this user may crown it
            allowed, why = registry.may_move_champion(client, params.model_name)
            if not allowed:
                decision.promote = False
                decision.reason += f"; but {why}: it waits as challenger for `graft promote {version}`"
        alias = registry.CHAMPION if decision.promote else registry.CHALLENGER
        if not decision.promote:
            # One challenger at a time: the newest candidate that did not win takes the alias.
            previous = registry.alias_version(client, params.model_name, registry.CHALLENGER)
            if previous is not None and str(previous.version) != version:
                decision.replaces_challenger = str(previous.version)
                decision.reason += f"; v{version} replaces v{previous.version} as challenger"
        for k, v in metrics.items():
            client.set_model_version_tag(params.model_name, version, f"test_{k}", f"{v:.6f}")
        client.set_model_version_tag(params.model_name, version, "graft.decision", json.dumps(decision.to_json()))
        client.update_model_version(params.model_name, version,
                                    description=describe(params.model_name, version, decision, metrics, tags))  # fmt: skip
        fault_point("after_tags")
        registry.move_alias(client, params.model_name, alias, version, decision.reason, run_id)
        client.set_model_version_tag(params.model_name, version, registry.STATE_TAG, "ready")
    except BaseException as e:
        # No half-registered model: repair() keeps the version only if its alias moved.
        try:
            undone = registry.repair(client, params.model_name)
        except Exception as again:  # the registry itself is gone: the next run repairs
            undone = [f"repair failed too ({type(again).__name__}: {again}); the next run retries it"]
        raise GraftError(f"registering {params.model_name} v{version} failed: {type(e).__name__}: {e}\n"
                         + "\n".join(f"  repaired: {line}" for line in undone)) from e  # fmt: skip
    return decision, version


def already_registered(client, name: str, mv, identity: str, run_id: str, metrics: dict[str, float],
                       n: int) -> gate.Decision:  # fmt: skip
    """The candidate is the very model version ``mv`` serves: link the run to it and
    register nothing (a second version of one model would be a challenger against itself)."""
    version = str(mv.version)
    alias = registry.held_alias(client.get_model_version(name, version))  # a search's results carry no aliases
    registry.link_run(client, name, version, run_id)
    champion = registry.alias_version(client, name, registry.CHAMPION)
    reason = (f"the same model as v{version} (weights, config and assets: sha256 {identity[:12]}...): "
              f"not registered again; this run is linked to v{version}")  # fmt: skip
    if alias != registry.CHAMPION:
        reason += f"; to make it champion: graft promote {version}"
    accuracy = float(metrics.get("accuracy", mv.tags.get("test_accuracy", 0.0)))
    return gate.Decision(False, reason, accuracy, str(champion.version) if champion else None, None, None, n,
                         same_as=version, same_as_alias=alias)  # fmt: skip


def alias_of(decision: gate.Decision) -> str:
    """The alias the registered (or matched) version holds after register."""
    if decision.same_as is not None:
        return decision.same_as_alias or "no alias"
    return registry.CHAMPION if decision.promote else registry.CHALLENGER


def format_decision(decision: gate.Decision, name: str, version: str) -> str:
    alias = alias_of(decision)
    if decision.same_as is not None:
        return f"register: {name} v{version} again ({alias}): nothing new registered\n  reason: {decision.reason}"
    lines = [f"register: {name} v{version} -> {alias}", f"  reason: {decision.reason}",
             f"  candidate test accuracy {decision.candidate_accuracy:.4f} on {decision.n} test samples"]  # fmt: skip
    if decision.champion_accuracy is not None:
        lines.append(f"  champion v{decision.champion_version} on the same samples: {decision.champion_accuracy:.4f}")
    if decision.candidate_serving:
        c, ch = decision.candidate_serving, decision.champion_serving
        lines.append(f"  serving: candidate {c['latency_ms_b1']:.2f} ms per sample (batch 1), {c['throughput_b64']:.0f}/s (batch 64)"
                     + (f"; champion v{decision.champion_version} {ch['latency_ms_b1']:.2f} ms, {ch['throughput_b64']:.0f}/s"
                        if ch else ""))  # fmt: skip
    if decision.mcnemar:
        m = decision.mcnemar
        lines.append(f"  McNemar: candidate-only correct {m['b']}, champion-only correct {m['c']}, p = {m['p_value']:.3g}")
    if decision.promote:
        lines.append(f"  load it with mlflow.pyfunc.load_model('models:/{name}@champion')")
    else:
        lines.append(f"  the champion stays v{decision.champion_version}; this one loads as 'models:/{name}/{version}'"
                     if decision.champion_version else f"  no champion; this one loads as 'models:/{name}/{version}'")  # fmt: skip
    return "\n".join(lines)
