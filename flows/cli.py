"""``graft``: run the pipeline, inspect and move the registry's aliases, predict.

Every command works on the project in the current directory (``--project`` to change
it) and on the MLflow store that ``MLFLOW_TRACKING_URI`` names, or the project's own
SQLite store under ``mlruns/`` when it is unset.
"""

# Each command imports the library it uses when it runs, not at the top: `graft --help`
# and a command's argument errors cost 0.18 s of CPU this way, 0.43 s with the library's
# imports (numpy, yaml, psutil) hoisted here (measured on the 2-core machine).

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from enum import Enum
from importlib import metadata
from pathlib import Path

import typer

from graft.config import paths

app = typer.Typer(
    help="graft: reproducible transfer learning. `graft run` trains, evaluates and registers a "
    "model through the DVC pipeline; `graft status` shows the registry; `graft predict` uses it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: the rich one shows `<bool>` after every flag
)

PROJECT = typer.Option(Path("."), "--project", "-C", help="project directory (where dvc.yaml and params.yaml are)")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"graft {metadata.version('graft')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print graft's version and exit"),
) -> None:
    """graft: reproducible transfer learning."""


# Prefect's temporary server (no graft servers running) gets this long to start: its
# default, 20 s, is too short on a loaded 2-core machine, where its first start migrates
# a fresh database.
STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_S = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 90


def _quiet_defaults() -> None:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # before Prefect is imported, which reads its settings once
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(STARTUP_TIMEOUT_S))


def _use_servers(root: Path, quiet: bool = False) -> dict[str, str]:
    """Point Prefect and MLflow at the project's servers when they run (before Prefect
    is imported, which reads its settings once), with this machine's credentials; say so."""
    from flows import services
    from graft.base.errors import GraftError

    given = {k: os.environ[k] for k in SERVER_KEYS if os.environ.get(k)}  # set by the user: they win
    try:
        env = services.client_env(root)
    except GraftError as e:  # a secrets file others can read, say
        _fail(str(e))
    for key, value in env.items():
        if not os.environ.get(key):
            os.environ[key] = value
    if not quiet:
        typer.echo(servers_in_use(given, env))
    return env


SERVER_KEYS = {"PREFECT_API_URL": "Prefect", "MLFLOW_TRACKING_URI": "MLflow"}
DEFAULT_SERVERS = {"PREFECT_API_URL": "Prefect's temporary local server (its history in .graft/prefect, which "
                                      "`graft server start` serves)", "MLFLOW_TRACKING_URI": "the MLflow store in mlruns/"}


def servers_in_use(given: dict[str, str], running: dict[str, str]) -> str:
    """One line: which Prefect and MLflow this command talks to, and where that came from
    (the environment, graft's running servers, or the defaults). Credentials never shown."""
    from graft.base.secrets import mask_url

    said = []
    for key, name in SERVER_KEYS.items():
        if key in given:
            said.append(f"{name} at {mask_url(given[key])} ({key} in the environment)")
        elif key in running:
            said.append(f"{name} at {mask_url(running[key])} (the servers `graft server start` runs)")
        else:
            said.append(DEFAULT_SERVERS[key] + " (no graft servers running)")
    return "servers: " + "; ".join(said)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _registry(project: Path):
    """(client, model name) for the project's registry."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    from graft.config.params import RegisterParams, load_section
    from graft.tracking import runs as tracking

    root = project.resolve()
    if not (root / "params.yaml").is_file():
        _fail(f"{root}: no params.yaml here; run graft from the project directory or pass --project")
    _use_servers(root, quiet=True)
    try:
        tracking.configure(root)
    except Exception as e:
        _fail(tracking.refused_message(e) or tracking.unreachable_message(e) or f"{type(e).__name__}: {e}")
    name = load_section(RegisterParams, "register", root / "params.yaml").model_name
    return mlflow.MlflowClient(), name


class Concurrency(str, Enum):
    wait = "wait"
    skip = "skip"


@app.command()
def run(
    set_: list[str] = typer.Option([], "--set", "-s", metavar="SECTION.KEY=VALUE",
                                   help="override a parameter in params.yaml for this and later runs (repeatable)"),
    preset: str = typer.Option(None, "--preset", "-p", metavar="NAME",
                               help="apply presets/NAME.yaml first, like a list of --set ('text': the text run; "
                               "'image': back to the image run); --set values win"),
    concurrency: Concurrency = typer.Option(Concurrency.wait, help="if another run is training in this project: "
                                            "wait for it, or skip this run"),
    project: Path = PROJECT,
) -> None:
    """Run the whole pipeline through the Prefect flow: stages DVC finds unchanged are skipped; a new model is registered and promoted only if it beats the current champion.

    With nothing changed, the run is still recorded in Prefect, every stage Cached.

    Ctrl-C (or SIGTERM) stops the stage and every process the run started within seconds; the next run resumes. A second Ctrl-C exits at once.

    Exit codes: 0 done (or skipped), 1 a stage crashed, 2 bad input (a wrong parameter, a missing or broken data source), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""
    _quiet_defaults()
    root = project.resolve()
    from graft.base.errors import BAD_INPUT_EXIT, GraftError
    from graft.config import project as project_config
    from graft.config.params import ParamsError, preset_overrides, read_params
    from graft.overrides import apply_overrides, check_inputs

    try:  # a typo in --set, params.yaml or graft.yaml, or a missing source, fails here, before anything starts
        project_config.load(root)
        overrides = [*(preset_overrides(preset, root) if preset else []), *set_]
        params = apply_overrides(read_params(root / "params.yaml"), overrides)
        check_inputs(params, root)
    except (ParamsError, GraftError) as e:
        _fail(str(e), BAD_INPUT_EXIT)
    _use_servers(root)
    from prefect import tags  # Prefect: imported with the flow above

    from flows import interrupt, services
    from flows.pipeline import StageFailed
    from flows.training import training_pipeline

    try:
        with interrupt.handled("graft run"), tags("graft", services.project_tag(root)):
            state = training_pipeline(project_dir=str(root), overrides=overrides, concurrency=concurrency.value,
                                      return_state=True)  # fmt: skip
    except interrupt.Interrupted as e:
        raise typer.Exit(e.exit_code) from None
    except Exception as e:  # the Prefect server refused this client before the flow could start
        refused = services.prefect_refused_message(e)
        if refused is None:
            raise
        _fail(refused, BAD_INPUT_EXIT)
    if not state.is_completed():
        try:
            state.result()
        except StageFailed as e:  # its message is in the log above, once
            typer.secho(f"\ngraft run: {e.headline}", fg=typer.colors.RED, bold=True, err=True)
            typer.echo(f"  what to do: {e.advice()}", err=True)
            raise typer.Exit(e.exit_code if 0 < e.exit_code < 256 else 1) from None
        except (ParamsError, GraftError) as e:
            _fail(str(e), BAD_INPUT_EXIT)
        except Exception as e:
            from graft.tracking.runs import refused_message

            if services.prefect_refused_message(e):
                _fail(services.prefect_refused_message(e) or "", BAD_INPUT_EXIT)
            _fail(refused_message(e) or f"the pipeline failed: {type(e).__name__}: {e}")
        _fail(f"the pipeline ended in state {state.name}")
    summary = state.result()
    if summary.get("skipped"):
        typer.echo(f"graft run: skipped: {summary['reason']}")
        return
    print_summary(summary, root)


def print_summary(summary: dict, root: Path) -> None:
    stages = summary["stages"]
    ran = [s for s, r in stages.items() if r == "ran"]
    restored = [s for s, r in stages.items() if r == "restored"]
    cached = [s for s, r in stages.items() if r == "cached"]
    pulled = [s for s, r in stages.items() if r == "pulled"]
    typer.echo("")
    typer.secho("graft run: done", bold=True)
    typer.echo(f"  stages run:    {', '.join(ran) or 'none'}")
    if pulled:
        typer.echo(f"  stages restored from the remote: {', '.join(pulled)} (pulled from the DVC remote, not recomputed)")
    if restored:
        typer.echo(f"  stages restored: {', '.join(restored)} (outputs put back from DVC's run-cache, here or on the remote: not recomputed)")
    typer.echo(f"  stages cached: {', '.join(cached) or 'none'} (unchanged inputs, skipped by DVC)")
    m = summary.get("metrics")
    if m:
        typer.echo(f"  test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} on {m['n']} test samples")
    d = summary.get("decision")
    if d:
        note = "" if "register" in ran else " (from the last run that registered; nothing new this time)"
        typer.echo(f"  registry: {d['model_name']} v{d['version']} is {d['alias']}{note}")
        typer.echo(f"    {d['reason']}")
    pushed = summary.get("remote")
    if pushed:
        state = pushed["message"] if pushed["ok"] else f"PUSH FAILED: {pushed['message']} (the model stays registered; the next run pushes again)"
        typer.echo(f"  DVC remote '{pushed['remote']}': {state}")
    typer.echo("  where to look:")
    typer.echo(f"    {root / 'reports'}/   metrics and plots (confusion matrix, reliability, mistakes)")
    typer.echo("    graft status          the registry's champion, challenger and history")
    typer.echo("    graft ui              MLflow's UI with every run, its params, metrics and plots")


@app.command()
def status(project: Path = PROJECT) -> None:
    """Show the champion, challenger and latest model versions with their metrics, data versions, and when and why the aliases last moved."""
    from flows import remote
    from graft.registry import rules as registry

    client, name = _registry(project)
    _repair(client, name, project.resolve())
    typer.echo(remote.describe(project.resolve()))
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:
        versions = []
    if not versions:
        typer.echo(f"No model registered under '{name}' yet. Run `graft run`.")
        return
    latest = max(versions, key=lambda v: int(v.version))
    hist = registry.history(client, name)
    pending = [f"v{v.version}" for v in versions if v.tags.get(registry.STATE_TAG) == "pending"]
    typer.secho(f"Registered model '{name}': {len(versions)} version(s)"
                + (f"; {', '.join(pending)} being registered (or interrupted: the next run repairs it)" if pending else ""),
                bold=True)  # fmt: skip
    for label, mv in (("champion", registry.alias_version(client, name, registry.CHAMPION)),
                      ("challenger", registry.alias_version(client, name, registry.CHALLENGER)), ("latest", latest)):  # fmt: skip
        if mv is None:
            typer.echo(f"  {label:<10} none")
            continue
        t = mv.tags
        acc = f"{float(t['test_accuracy']):.4f}" if "test_accuracy" in t else "?"
        typer.echo(f"  {label:<10} v{mv.version}  test accuracy {acc}  data {t.get('data_version', '?')[:12]}  "
                   f"commit {t.get('git_commit', '?')[:10]}  run {t.get('mlflow_run_id', '?')[:12]}")  # fmt: skip
        if t.get("graft.teacher"):  # a student: its teachers, this model's own versions as "vN"
            teachers = t["graft.teacher"].replace(f"{name} v", "v")
            typer.echo(f"             distilled from {teachers} (weights sha256 {t.get('graft.teacher_weights_sha256', '?')[:12]})")
        if t.get("graft.reproduced"):
            r = json.loads(t["graft.reproduced"])
            typer.echo(f"             reproduced {r['date']}: {r['verdict']}" + (f" (run {r['run_id'][:12]})" if r.get("run_id") else "")
                       + (f": {r['why'].splitlines()[0]}" if r.get("why") else ""))  # fmt: skip
        if label != "latest":
            moves = [h for h in hist if h["alias"] == label and h["to_version"] == str(mv.version)]
            if moves:
                typer.echo(f"             since {moves[-1]['time']}: {moves[-1]['reason']}")
    outside = registry.moved_outside(client, name)
    if outside:
        typer.secho(f"  warning: {outside}", fg=typer.colors.YELLOW)
    if hist:
        typer.echo("  alias history (newest last):")
        for line in history_table(hist[-10:]):
            typer.echo(f"    {line}")
        if len(hist) > 10:
            typer.echo(f"    ({len(hist) - 10} earlier move(s) not shown)")


def history_table(moves: list[dict]) -> list[str]:
    """Alias moves as aligned text rows: time, alias, from, to, who, why."""
    rows = [("time (UTC)", "alias", "from", "to", "by", "reason")]
    for h in moves:
        rows.append((h["time"].replace("+00:00", "").replace("T", " "), h["alias"],
                     f"v{h['from_version']}" if h["from_version"] else "-",
                     f"v{h['to_version']}" if h["to_version"] else "(removed)",
                     h.get("user") or "?",
                     h["reason"] + ("" if h.get("state", "done") == "done" else f" [{h['state']}]")))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]


@app.command()
def promote(
    version: str = typer.Argument(..., help="model version to make champion"),
    reason: str = typer.Option("", "--reason", "-r", help="why (recorded in the alias history)"),
    force: bool = typer.Option(False, "--force", help="skip the gate (no comparison against the champion)"),
    project: Path = PROJECT,
) -> None:
    """Make VERSION the champion. Unless --force, it must beat the current champion on the project's current test samples, with the same gate as the pipeline."""
    from graft.base.errors import GraftError
    from graft.promotion import by_hand

    client, name = _registry(project)
    _require_champion_permission(client, name)
    _repair(client, name, project.resolve())
    try:
        typer.echo(by_hand.promote(client, name, version, project.resolve(), reason, force, say=typer.echo))
    except GraftError as e:
        _fail(str(e))


@app.command()
def rollback(
    reason: str = typer.Option("rollback", "--reason", "-r", help="why (recorded in the alias history)"),
    project: Path = PROJECT,
) -> None:
    """Move the champion back to the version that held it before."""
    from graft.base.errors import GraftError
    from graft.promotion import by_hand

    client, name = _registry(project)
    _require_champion_permission(client, name)
    _repair(client, name, project.resolve())
    try:
        typer.echo(by_hand.rollback(client, name, reason))
    except GraftError as e:
        _fail(str(e))


def _require_champion_permission(client, name: str) -> None:
    """Refuse, before anything is scored or written, a champion move the tracking server
    says this user may not make."""
    from graft.base.errors import GraftError
    from graft.registry import rules as registry

    try:
        allowed, why = registry.may_move_champion(client, name)
    except GraftError as e:
        _fail(str(e))
    if not allowed:
        _fail(f"{why}; nothing was changed")


@app.command()
def reproduce(
    model_ref: str = typer.Argument("champion", metavar="MODEL_REF",
                                    help="champion, challenger, a version number, NAME@ALIAS or NAME/VERSION"),
    keep: bool = typer.Option(False, "--keep", help="keep the temporary worktree (to inspect the rerun)"),
    project: Path = PROJECT,
) -> None:
    """Rerun the pipeline that produced a registered version (its commit and uncommitted diff, its params.yaml, its data snapshot by hash, its pretrained weights) up to evaluate, in a temporary git worktree, and compare inputs, weights and metrics.

    Exit codes: 0 identical (or within the documented tolerance), 1 differs, 2 cannot reproduce (says what is missing). The aliases are never touched; the outcome is recorded on the version (`graft status` shows it)."""

    from flows import reproduce as rep
    from graft.base.errors import BAD_INPUT_EXIT

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, default_name = _registry(project)
    started = time.monotonic()
    try:
        name, version = rep.resolve_ref(client, default_name, model_ref)
        outcome, rows, run_id = rep.reproduce(project.resolve(), client, name, version, typer.echo, keep=keep)
    except rep.CannotReproduce as e:
        _fail(f"cannot reproduce: {e}", BAD_INPUT_EXIT)
    for line in rep.table(rows):
        typer.echo(f"  {line}")
    minutes = (time.monotonic() - started) / 60
    color = {rep.IDENTICAL: typer.colors.GREEN, rep.WITHIN: typer.colors.YELLOW}.get(outcome, typer.colors.RED)
    typer.secho(f"{name} v{version}: {outcome} (reproduction run {run_id}, {minutes:.1f} min)", fg=color, bold=True)
    if outcome == rep.WITHIN:
        typer.echo("  every input identical, figures within tolerance (docs: How reproducibility works): "
                   "expected on other hardware only")  # fmt: skip
    if why := rep.why_weights_differ(rows):
        typer.echo(f"  {why}")
    if outcome == rep.DIFFERS:
        raise typer.Exit(1)


@app.command("diff")
def diff_cmd(
    a: str = typer.Argument(..., metavar="A", help="a version: champion, challenger, a number, NAME@ALIAS or NAME/VERSION"),
    b: str = typer.Argument("workspace", metavar="B", help="another version, or 'workspace' for the working copy's last run"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (for scripts) instead of text"),
    no_score: bool = typer.Option(False, "--no-score", help="skip scoring both versions on this workspace's test samples"),
    project: Path = PROJECT,
) -> None:
    """What differs between two registered versions, or a version and the working copy: params, data (classes, per-class counts, files added and removed), pretrained backbone, metrics with per-class deltas, and a paired McNemar test on this workspace's test samples."""
    from flows import diff as df
    from flows import reproduce as rep
    from graft.base.errors import GraftError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, name = _registry(project)
    root = project.resolve()
    try:
        sides = []
        for ref in (a, b):
            if ref == df.WORKSPACE:
                sides.append(df.workspace_side(root))
            else:
                model, version = rep.resolve_ref(client, name, ref)
                sides.append(df.version_side(client, model, version))
        result = df.diff(root, client, name, *sides, score=not no_score)
    except GraftError as e:
        _fail(str(e), 2)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        for line in df.render(result):
            typer.echo(line)


REPAIR_AFTER_SECONDS = 600  # a registration takes seconds to a minute: older leftovers are wrecks


def _repair(client, name: str, root: Path) -> None:
    """Finish or undo an interrupted registration or alias move (see registry.repair), but
    only while no training run holds the project: a registration under way is not a wreck."""
    from flows.pipeline import ProjectLock
    from graft.registry import rules as registry
    from graft.tracking import runs as tracking

    lock = ProjectLock(root)
    if not lock.acquire(wait=False):
        return
    try:
        # Plain `dvc repro` does not take graft's lock: a registration younger than this
        # may still be under way.
        for line in registry.repair(client, name, min_age_seconds=REPAIR_AFTER_SECONDS):
            typer.secho(f"repaired: {line}", fg=typer.colors.YELLOW)
        experiment = client.get_experiment_by_name(tracking.experiment_name())
        for run_id in tracking.end_orphans(client, experiment.experiment_id, root) if experiment else []:
            typer.secho(f"repaired: MLflow run {run_id} was left RUNNING by a run that died: marked FAILED",
                        fg=typer.colors.YELLOW)  # fmt: skip
    finally:
        lock.release()


@app.command()
def drift(
    path: Path = typer.Argument(..., help="incoming samples, as `graft predict` takes them (image models: an image folder; "
                                "text models: a .txt file, a table, a folder of .txt files). A folder with one sub-folder per "
                                "class (optionally under train/ and test/) is also tested class by class"),
    reference: str = typer.Option(None, "--reference", "-r", help="what to test against: champion, another alias, "
                                  "name/version, or a reference folder (a run's data/reference); default: drift.reference"),
    alpha: float = typer.Option(None, help="the test's level (default: drift.alpha of params.yaml)"),
    out: Path = typer.Option(None, "--out", "-o", help="also write the report here (drift.json and the plot drift.png)"),
    exit_code: bool = typer.Option(False, "--exit-code", help="exit with 1 when the data drifted (for scripts and schedulers)"),
    text_column: str = typer.Option("text", help="text models, table input: the column holding the texts"),
    project: Path = PROJECT,
) -> None:
    """Test incoming samples for drift against the champion's training data: the drift gate's test (MMD in the
    pretrained backbone's embedding space, overall and per class, and a domain classifier's AUC), and its verdict."""
    from graft.base.errors import GraftError
    from graft.config.params import DriftParams, ParamsError, load_section, replace
    from graft.drift import gate as drift_stage

    _quiet_defaults()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _, name = _registry(project)
    root = project.resolve()
    if not path.exists():
        _fail(f"{path}: no such file or folder", 2)
    try:
        p = load_section(DriftParams, "drift", root / paths.PARAMS)
        if alpha is not None:
            p = replace(p, "drift", alpha=alpha)
        report = drift_stage.path_drift(path, reference or p.reference or "champion", name, p,
                                       root / paths.PRETRAINED, text_column, out)  # fmt: skip
    except (GraftError, ParamsError) as e:
        _fail(str(e), 2)
    typer.echo(drift_stage.summary(report))
    folders = report.get("class_folders") or {}
    if renamed := [f"{f} -> {c}" for f, c in folders.items() if c is not None and c != f]:
        typer.echo(f"  class folders matched by name: {', '.join(renamed)}")
    if unknown := [f for f, c in folders.items() if c is None]:
        typer.echo(f"  class folders the reference does not know (in the overall test, no test of their own): {', '.join(unknown)}")
    if not report.get("labelled"):
        typer.echo("  (no class sub-folders: the overall test only)")
    if out is not None:
        typer.echo(f"  report -> {out / drift_stage.REPORT}, plot -> {out / drift_stage.PLOT}")
    if exit_code and report["verdict"] == "drift":
        raise typer.Exit(1)


def _missing_model(client, name: str, model: str) -> str | None:
    """Why ``model`` (an alias or a version number) names nothing in the registry, in
    words that say what does exist; None when it names a version."""
    from mlflow.exceptions import MlflowException  # MLflow: imported where used

    from graft.registry import rules as registry

    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        versions = []
    if not versions:
        return f"no model is registered under '{name}' yet: `graft run` trains and registers one"
    if model.isdigit():
        if int(model) in versions:
            return None
        return f"'{name}' has no version {model}; it has {', '.join(f'v{v}' for v in versions)} (`graft status`)"
    if registry.alias_version(client, name, model) is not None:
        return None
    held = {a: mv.version for a in (registry.CHAMPION, registry.CHALLENGER)
            if (mv := registry.alias_version(client, name, a)) is not None}  # fmt: skip
    hint = f"--model {next(iter(held))}" if held else f"--model {versions[-1]}"
    what = "; ".join(f"{a} is v{v}" for a, v in held.items()) if held else "no version holds an alias"
    return (f"'{name}' has no {model}: {what} (versions {', '.join(f'v{v}' for v in versions)}). "
            f"Pick one with {hint}, or make one champion with `graft promote <version>`")


@app.command()
def predict(
    path: Path = typer.Argument(..., help="what to classify. Image models: an image, or a folder searched recursively "
                                "for images. Text models: a .txt file (one text per line), a CSV/TSV/JSON-lines table "
                                "(see --text-column), or a folder of .txt files (one text each)"),
    model: str = typer.Option("champion", "--model", "-m", help="'champion', 'challenger' or a version number"),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="CSV to write (one row per sample)"),
    batch_size: int = typer.Option(64, help="samples per batch"),
    text_column: str = typer.Option("text", help="text models, table input: the column holding the texts"),
    project: Path = PROJECT,
) -> None:
    """Classify images or texts with a registered model; write the input's name, class and probability per sample."""
    from graft.base.errors import GraftError

    client, name = _registry(project)
    if not path.exists():
        _fail(f"{path}: no such file or folder")
    uri = f"models:/{name}/{model}" if model.isdigit() else f"models:/{name}@{model}"
    missing = _missing_model(client, name, model)
    if missing:
        _fail(missing)
    from graft.models import serving  # mlflow.pyfunc: 1.5 to 2 s of import, only when a model is loaded

    try:
        pyfunc = serving.load_registered(uri)
    except Exception as e:
        _fail(f"cannot load {uri}: {e}. `graft status` lists the versions and aliases.")
    kind = pyfunc.unwrap_python_model().cfg.kind  # the model says what it reads
    try:
        inputs = kind.read_inputs(path, text_column)
    except GraftError as e:
        _fail(f"{e} ({uri} is a{'n' if kind.NAME[0] in 'aeiou' else ''} {kind.NAME} model)")
    from graft.models.predict import predict_to_csv

    result = predict_to_csv(pyfunc, kind, inputs, out, batch_size, columns=kind.input_columns(path, text_column))
    total, bad, counts = result.total, result.bad, result.counts
    typer.echo(f"{total} {kind.SAMPLES[:-1]}(s): {total - bad} classified with {uri}"
               + (f", {bad} could not be decoded (rows with an error)" if bad else "") + f" -> {out}")  # fmt: skip
    for cls, n in counts.most_common(10):
        typer.echo(f"  {cls}: {n}")


@app.command()
def ui(
    port: int = typer.Option(5000, help="port on 127.0.0.1"),
    project: Path = PROJECT,
) -> None:
    """Start MLflow's UI on 127.0.0.1 for the project's runs and registry (Ctrl-C stops it). If `graft server start` runs, its MLflow server already serves the UI: this says where."""

    from flows import services
    from graft.base.secrets import mask_url
    from graft.tracking import runs as tracking

    root = project.resolve()
    running = services.status(root)["mlflow"]
    if running["running"]:
        typer.echo(f"graft's MLflow server already serves the UI: open {_runs_page(root, running['url'])} in a browser")
        raise typer.Exit(0)
    with socket.socket() as probe:  # a taken port would only fail later, inside the server
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            _fail(f"port {port} on 127.0.0.1 is in use by another program; choose another with `graft ui --port N`")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(root)
    page = _runs_page(root, f"http://127.0.0.1:{port}", uri)
    typer.echo(f"MLflow UI for {mask_url(uri)}\n  open {page} in a browser; Ctrl-C stops it")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # The store through MLflow's variable: a command line is visible to every user (`ps`).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": uri}
    try:
        code = subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    if code != 0:
        _fail(f"MLflow's UI server exited with code {code}", code)


def _runs_page(root: Path, ui: str, store: str | None = None) -> str:
    """The experiment's runs table on the UI at ``ui`` (the experiment made if it is not yet,
    marked as model training); the UI's root where the store cannot be read."""
    from graft.tracking import runs as tracking

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        os.environ["MLFLOW_TRACKING_URI"] = store or ui
        return tracking.runs_page(ui, tracking.configure(root))
    except Exception:  # a server that refuses us, say: the root page still serves
        return ui
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


server_app = typer.Typer(help="Start, stop and inspect the project's Prefect and MLflow servers (127.0.0.1).",
                         no_args_is_help=True)  # fmt: skip
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    host: str | None = typer.Option(None, "--host", help="address both servers listen on, for this start (default: "
                                       "servers.<name>.host in graft.yaml, 127.0.0.1); beyond loopback they ask for "
                                       "credentials (`graft server init-auth`)"),
    project: Path = PROJECT,
) -> None:
    """Start the Prefect and MLflow servers in the background (ports and stores from graft.yaml) and wait until both answer."""
    from flows import services
    from graft.base.errors import GraftError

    root = project.resolve()
    typer.echo("starting the Prefect and MLflow servers (a few seconds)...")
    try:
        started = services.start(root, host=host)
    except GraftError as e:
        _fail(str(e))
    for name, st in started.items():
        typer.echo(f"  {name:<8} API {st['url']}  pid {st['pid']}  log {st['log']}")
    typer.echo("open in a browser:")
    for name, st in started.items():
        typer.echo(f"  {name:<8} UI  {services.ui_url(st)}")
    if any(st.get("auth") for st in started.values()):
        typer.echo("both ask for credentials: Prefect its auth string (PREFECT_API_AUTH_STRING), MLflow a user "
                   "(`graft server user add`); this machine's are in .graft/secrets.yaml")  # fmt: skip
    typer.echo("`graft run`, `graft schedule` and `graft serve` now use them; `graft server stop` stops them.")


@server_app.command("stop")
def server_stop(project: Path = PROJECT) -> None:
    """Stop both servers and every process they started."""
    from flows import services

    stopped = services.stop(project.resolve())
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "no graft server was running")


@server_app.command("status")
def server_status(project: Path = PROJECT) -> None:
    """Whether each server runs and answers its health check, and the shared DVC remote."""
    from flows import remote, services

    for name, st in services.status(project.resolve()).items():
        state = "running" if st["running"] else ("not answering" if st.get("pid") else "stopped")
        extra = ""
        if st.get("pid"):
            extra = f"  UI {services.ui_url(st)}  API {st['url']}  pid {st['pid']}"
            extra += "  (credentials required)" if st.get("auth") else "  (no credentials asked)"
            extra += f"  store {st['store']}" if st.get("store") else ""
        typer.echo(f"  {name:<8} {state}{extra}")
    typer.echo(f"  {remote.describe(project.resolve())}")


@server_app.command("init-auth")
def server_init_auth(project: Path = PROJECT) -> None:
    """Generate the servers' credentials (MLflow's admin password and CSRF key, Prefect's auth string) into .graft/secrets.yaml, mode 0600; those already there are kept. Needed before the servers listen beyond 127.0.0.1."""
    from graft.base import secrets

    root = project.resolve()
    current = secrets.read_file(root)
    new = {}
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        if key not in current:
            new[key] = secrets.new_password()
    if "PREFECT_SERVER_API_AUTH_STRING" not in current:
        new["PREFECT_SERVER_API_AUTH_STRING"] = f"graft:{secrets.new_password()}"
    path = secrets.write_file(root, new)
    typer.echo(f"{path} (mode 600): " + (f"generated {', '.join(new)}" if new else "every server credential was already there"))
    typer.echo("next: `graft server start --host 0.0.0.0` (or servers.<name>.host in graft.yaml), then "
               "`graft server user add NAME --permission EDIT` for each teammate; they set MLFLOW_TRACKING_USERNAME, "
               "MLFLOW_TRACKING_PASSWORD and PREFECT_API_AUTH_STRING (the value of PREFECT_SERVER_API_AUTH_STRING) "
               "in their environment or their own .graft/secrets.yaml")  # fmt: skip


user_app = typer.Typer(help="MLflow users of an authenticating server and what they may do: READ (see runs and "
                       "models), EDIT (run the pipeline: log runs, register versions, set the challenger), "
                       "MANAGE (also move the champion: promote, rollback, the pipeline's promotions).",
                       no_args_is_help=True)  # fmt: skip
server_app.add_typer(user_app, name="user")


class Permission(str, Enum):
    READ = "READ"
    EDIT = "EDIT"
    MANAGE = "MANAGE"
    NO_PERMISSIONS = "NO_PERMISSIONS"


def _admin_client(root: Path):
    from flows import services
    from graft.base.errors import GraftError

    try:
        return services.admin_client(root)
    except GraftError as e:
        _fail(str(e))


def _grant(root: Path, auth, username: str, permission: str) -> list[str]:
    from flows import services

    client, name = _registry(root)
    return services.grant_project(root, auth, client, name, username, permission)


MIN_PASSWORD = 12  # characters: a user's password on the MLflow server


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD:
        _fail(f"choose a password of at least {MIN_PASSWORD} characters")
    return password


@user_app.command("add", help="Create an MLflow user on the project's server (as its admin) and grant it PERMISSION on "
                  f"the project's experiment and registered model. The password: at least {MIN_PASSWORD} characters.")
def user_add(
    username: str = typer.Argument(..., help="the new user's name"),
    permission: Permission = typer.Option(Permission.EDIT, help="what the user may do on the project's experiment and registered model"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="read the password from the first line of "
                                        "standard input (scripts) instead of asking twice; never pass it as an argument"),
    project: Path = PROJECT,
) -> None:
    root = project.resolve()
    auth = _admin_client(root)
    password = _read_password(password_stdin)
    try:
        auth.create_user(username, password)
    except Exception as e:
        _fail(f"cannot create user {username}: {_first_line(e)}")
    granted = _grant(root, auth, username, permission.value)
    typer.echo(f"user {username} created with {permission.value} on {' and '.join(granted)}")


@user_app.command("grant")
def user_grant(
    username: str = typer.Argument(..., help="an existing user"),
    permission: Permission = typer.Option(..., help="what the user may do from now on"),
    project: Path = PROJECT,
) -> None:
    """Change what USERNAME may do on the project's experiment and registered model."""
    root = project.resolve()
    auth = _admin_client(root)
    try:
        auth.get_user(username)
    except Exception as e:
        _fail(f"no user {username} on this server ({_first_line(e)}); create it with `graft server user add`")
    granted = _grant(root, auth, username, permission.value)
    typer.echo(f"user {username} now has {permission.value} on {' and '.join(granted)}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _require_prefect_server(root: Path) -> None:
    _quiet_defaults()
    env = _use_servers(root)
    if "PREFECT_API_URL" not in env and not os.environ.get("PREFECT_API_URL"):
        _fail("deployments live on a Prefect server: start one with `graft server start` (or set PREFECT_API_URL)")


@app.command()
def schedule(
    sensor: bool = typer.Option(True, "--sensor/--no-sensor", help="also deploy the data sensor (retrain when data changes); not with --pool"),
    verify: bool = typer.Option(False, "--verify", help="also deploy the champion's reproduction on verify.cron (weekly), "
                                "notified through the webhook when it no longer reproduces; not with --pool"),
    pool: str | None = typer.Option(None, help="a Prefect work pool (created if missing): its workers, on any machine, "
                                       "clone the code, pull the data and run the retraining instead of `graft serve`"),
    repo: str | None = typer.Option(None, help="with --pool: the git repository workers clone (default: this copy's origin)"),
    branch: str | None = typer.Option(None, help="with --pool: the branch workers run (default: the current one)"),
    commit: str | None = typer.Option(None, help="with --pool: pin the workers to this commit instead of a branch"),
    project: Path = PROJECT,
) -> None:
    """Create (or update) the Prefect deployments that retrain on schedule.cron and check the data on sensor.cron (graft.yaml). Run them here with `graft serve`, or anywhere with workers of --pool (`prefect worker start --pool P`, from graft's environment)."""
    root = project.resolve()
    _require_prefect_server(root)
    from flows import deploy
    from graft.base.errors import GraftError

    sched, sens = deploy.schedule_config(root)
    if pool:
        from flows import remote
        from graft.tracking import runs as tracking

        if remote.default_remote(root) is None:
            _fail("a worker's checkout is temporary: its data and models must go to a DVC remote. Add one "
                  "(`dvc remote add -d NAME URL`, commit .dvc/config, push), then schedule again")  # fmt: skip
        try:
            checkout = deploy.checkout_for(root, repo, branch, commit)
            d = deploy.pool_deployment(root, pool, checkout, os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(root))
        except GraftError as e:
            _fail(str(e))
        if deploy.ensure_pool(pool):
            typer.echo(f"work pool {pool!r} created (process workers)")
        deploy.ensure_crash_detection(root)
        d.apply(work_pool_name=pool)
        typer.echo(f"deployment {d.flow_name}/{d.name}: cron '{sched.cron}' ({sched.timezone}), on pool {pool!r}")
        typer.echo(f"  workers clone {checkout}, pull the DVC data, log to {d.job_variables['env']['MLFLOW_TRACKING_URI']}")
        if sensor:
            typer.echo("  (the data sensor is not deployed to workers: it compares the source with this copy's last "
                       "accepted run; serve it here with `graft serve`)")  # fmt: skip
        typer.echo(f"start a worker on any machine, from graft's environment: prefect worker start --pool {pool}")
        return
    for d in deploy.deployments(root, sensor=sensor, verify=verify):
        d.apply()
        cron = {"graft-training": sched.cron, "graft-verify": deploy.verify_config(root).cron}.get(d.flow_name, sens.cron)
        typer.echo(f"deployment {d.flow_name}/{d.name}: cron '{cron}' ({sched.timezone})")
    typer.echo("run the scheduled runs with `graft serve" + (" --verify" if verify else "") + "` (keeps running; Ctrl-C stops it)")


@app.command()
def secret(
    key: str = typer.Argument(..., help="the variable's name, e.g. MLFLOW_TRACKING_PASSWORD (`graft secret --list` names them all)"),
    stdin: bool = typer.Option(False, "--stdin", help="read the value from the first line of standard input instead of asking"),
    project: Path = PROJECT,
) -> None:
    """Store a credential in .graft/secrets.yaml (mode 0600, git-ignored), asked without echo: never typed on a command line or into `export`, where shell history and `ps` keep it."""
    from graft.base import secrets

    if key not in secrets.KEYS:
        _fail(f"{key} is not a credential graft reads; known: " + "; ".join(f"{k} ({w})" for k, w in secrets.KEYS.items()))
    value = sys.stdin.readline().rstrip("\n") if stdin else typer.prompt(key, hide_input=True)
    if not value:
        _fail("an empty value: nothing stored")
    path = secrets.write_file(project.resolve(), {key: value})
    typer.echo(f"{key} stored in {path} (mode 600)" + (f"; the environment's {key} still wins over it" if os.environ.get(key) else ""))


@app.command()
def worker(
    pool: str = typer.Option(..., "--pool", help="the Prefect work pool to take runs from (`graft schedule --pool`)"),
    project: Path = PROJECT,
) -> None:
    """Start a Prefect process worker on this machine with this project's credentials (.graft/secrets.yaml or the environment), so that the runs it starts reach the servers; Ctrl-C stops it."""
    _quiet_defaults()
    _use_servers(project.resolve(), quiet=True)
    if not os.environ.get("PREFECT_API_URL"):
        _fail("a worker takes its runs from a Prefect server: set PREFECT_API_URL (e.g. http://10.0.0.5:4200/api)")
    prefect = Path(sys.executable).parent / "prefect"
    typer.echo(f"starting a Prefect worker for pool {pool} on {os.environ['PREFECT_API_URL']}"
               + (" with credentials" if os.environ.get("PREFECT_API_AUTH_STRING") else ""))  # fmt: skip
    os.execv(str(prefect), [str(prefect), "worker", "start", "--pool", pool])  # credentials go in the environment


@app.command()
def pull(
    version: str | None = typer.Option(None, "--version", "-v", help="a registered version ('champion', 'challenger' or a "
                                          "number): first put the dvc.lock of the run that produced it here"),
    install: bool = typer.Option(False, "--install", help="first install what pyproject.toml requires and this environment "
                                 "lacks (a worker's pull step does)"),
    project: Path = PROJECT,
) -> None:
    """Fetch the pipeline's data and models from the DVC remote without running anything: the outputs dvc.lock records, and the run-cache with which `graft run` restores stages that other copies (a worker, a teammate) already ran."""
    _quiet_defaults()
    root = project.resolve()
    from flows import remote
    from graft.base.errors import GraftError

    try:
        if install:
            from flows.environment import install_missing

            install_missing(root, echo=typer.echo)
        if version is not None:
            _checkout_version_lock(root, version)
        result = remote.pull_all(root)
        restored = remote.restore_from_run_cache(root)
        restored += [s for s in remote.restore_past_the_lock(root, None, pull=True) if s not in restored]
    except GraftError as e:
        _fail(str(e))
    from flows.pipeline import stale_stages

    typer.echo(f"DVC remote {result['remote']}: {result['fetched']} object(s) fetched ({result['fetched_mb']:.1f} MB), "
               f"{result['changed']} output(s) checked out")  # fmt: skip
    if restored:
        typer.echo(f"  restored from the run-cache: {', '.join(restored)}")
    stale = stale_stages(root)
    typer.echo(f"  still to run or restore: {', '.join(stale)} (`graft run` restores those the run-cache knows)" if stale
               else "  every stage is up to date: `graft run` has nothing to do")  # fmt: skip


def _checkout_version_lock(root: Path, version: str) -> None:
    """Write to ``root/dvc.lock`` the lock file that the flow run behind a registered version
    logged to MLflow: afterwards `dvc pull` fetches exactly that version's data and model."""

    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    from flows.training import PIPELINE_ARTIFACTS
    from graft.base import fsio
    from graft.base.errors import GraftError
    from graft.registry.rules import alias_version

    client, name = _registry(root)
    mv = client.get_model_version(name, version) if version.isdigit() else alias_version(client, name, version)
    if mv is None:
        raise GraftError(f"{name} has no version {version!r}; `graft status` lists the versions and aliases")
    run = client.get_run(mv.run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        raise GraftError(f"{name} v{mv.version} (run {mv.run_id}) was not trained by a graft flow run: no pipeline record to pull")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path=f"{PIPELINE_ARTIFACTS}/dvc.lock", dst_path=tmp)
        except Exception as e:
            raise GraftError(f"{name} v{mv.version}: its flow run {parent} kept no dvc.lock ({e}); it predates this feature") from e
        fsio.write_bytes(root / "dvc.lock", Path(local).read_bytes())
    commit = run.data.tags.get("mlflow.source.git.commit", "unknown")
    typer.echo(f"dvc.lock of {name} v{mv.version} (flow run {parent}, git commit {commit}) written to {root / 'dvc.lock'}")


@app.command()
def serve(
    sensor: bool = typer.Option(True, "--sensor/--no-sensor", help="also serve the data sensor"),
    verify: bool = typer.Option(False, "--verify", help="also serve the champion's scheduled reproduction"),
    project: Path = PROJECT,
) -> None:
    """Serve the deployments in this process: scheduled and triggered runs execute here until Ctrl-C."""
    root = project.resolve()
    _require_prefect_server(root)
    from prefect import serve as prefect_serve  # Prefect: ~1.4 s of import, paid by the commands that use it

    from flows.deploy import deployments

    prefect_serve(*deployments(root, sensor=sensor, verify=verify))


@app.command()
def sensor(
    trigger: str = typer.Option(None, help="change: retrain when the source changed; drift: only when it also drifted "
                                "from the champion's data (default: sensor.trigger of graft.yaml)"),
    project: Path = PROJECT,
) -> None:
    """Check the data source once: start a training run if it changed since the last accepted run."""
    _quiet_defaults()
    root = project.resolve()
    _use_servers(root)
    from flows.deploy import schedule_config
    from flows.sensor import data_sensor

    trigger = trigger or schedule_config(root)[1].trigger
    if trigger not in ("change", "drift"):
        _fail(f"--trigger must be change or drift, got {trigger!r}", 2)
    result = data_sensor(project_dir=str(root), trigger=trigger)
    fp = result["fingerprint"]
    if not result["triggered"] and result.get("drift") == "no_drift":
        typer.echo(f"data changed ({fp['files']} files in {fp['path']}) but did not drift from the champion's: no training run")
    elif not result["triggered"]:
        typer.echo(f"data unchanged ({fp['files']} files in {fp['path']}): no training run")
    elif result["summary"].get("skipped"):
        typer.echo(f"data changed, but {result['summary']['reason']}: skipped")
    else:
        print_summary(result["summary"], root)


def main() -> None:  # pragma: no cover - the console script
    app()


if __name__ == "__main__":
    main()
