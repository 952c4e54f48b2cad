"""``graft reproduce``: rebuild exactly what produced a registered model version, rerun its
pipeline up to ``evaluate``, and say whether the rerun gives the same model.

What a version was made from comes from its lineage, recorded when it was trained: the
git commit (plus ``git diff HEAD`` when the tree was dirty), ``params.yaml`` as used, and
``dvc.lock`` as it stood when training started (the hashes of the data snapshot, the
prepared data and the pretrained model), all artifacts of its training run under
``lineage/``; the sha256 of the pretrained and fine-tuned weights are tags of that run.

The rerun happens in a temporary git worktree at that commit, with this project's DVC
cache (and remote): the data snapshot is checked out by its hashes and verified file by
file, never re-ingested from a source that may have changed since; every later stage is
run again (``dvc repro --force``). It logs to MLflow as a run tagged
``graft.reproduction_of`` and never touches the registry's aliases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

from graft.base import fsio, kernels, threads
from graft.base.errors import STATUS_ENV, GraftError
from graft.config import paths
from graft.models import modeling
from graft.registry import rules as registry
from graft.tracking import runs as tracking

RERUN_STAGES = ("preprocess", "load_pretrained", "fine_tune", "evaluate")
# Restored by hash, not rerun: the data snapshot, the gate's report, a teacher's soft
# labels (the teacher itself may be long gone from the registry) and the drift gate's
# reference and report (its verdict was against the champion of that day). Versions from
# before a stage existed simply have none of it.
RESTORED_STAGES = ("ingest", "validate", "teach", "drift")
REPRODUCED_TAG = "graft.reproduced"
# A rerun on other hardware (another CPU's kernels, a GPU) may differ in the last bits;
# figures this close still count as reproduced. The CPU default is bit-identical.
TOLERANCE = {"accuracy": 0.005, "macro_f1": 0.005, "ece": 0.005, "per_class_f1": 0.02}
IDENTICAL, WITHIN, DIFFERS = "identical", "within tolerance", "differs"


class CannotReproduce(GraftError):
    """An input of the version cannot be rebuilt here (exit 2): says which and how to get it."""


@dataclass
class Lineage:
    name: str
    version: str
    commit: str
    training_run_id: str
    evaluation_run_id: str
    params_yaml: bytes
    lock: dict[str, Any]
    diff: bytes | None
    pretrained_sha256: str
    weights_sha256: str | None
    metrics: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)
    cpu_kernels: str | None = None  # ATen's level at training (graft/base/kernels.py); None before it was recorded
    threads: str | None = None  # the training's torch thread pool (graft/base/threads.py TAG); None before it was recorded
    torch: str | None = None  # torch's version at training (graft/base/kernels.py TORCH_TAG); None before it was recorded


@dataclass
class Row:
    what: str
    original: str
    reproduced: str
    status: str


# --- which version ---------------------------------------------------------------------------


def resolve_ref(client, default_name: str, ref: str) -> tuple[str, str]:
    """``champion``, ``challenger``, ``3``, ``name@alias`` or ``name/3`` -> (name, version)."""
    name, rest = default_name, ref
    if "@" in ref:
        name, rest = ref.split("@", 1)
    elif "/" in ref:
        name, rest = ref.split("/", 1)
    if rest.isdigit():
        try:
            client.get_model_version(name, rest)
        except Exception:
            raise CannotReproduce(f"'{name}' has no version {rest}; `graft status` lists them") from None
        return name, rest
    mv = registry.alias_version(client, name, rest)
    if mv is None:
        raise CannotReproduce(f"'{name}' has no alias '{rest}'; use champion, challenger, a version number, "
                              "NAME@ALIAS or NAME/VERSION")  # fmt: skip
    return name, str(mv.version)


def read_lineage(client, name: str, version: str) -> Lineage:
    """Everything recorded about what produced ``name`` v``version``."""
    from mlflow.artifacts import download_artifacts  # MLflow: imported where used

    mv = client.get_model_version(name, version)
    training_run_id = mv.tags.get("training_run_id") or mv.run_id
    commit = mv.tags.get("git_commit", "unknown")
    run = client.get_run(training_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(download_artifacts(run_id=training_run_id, artifact_path=tracking.LINEAGE_DIR, dst_path=tmp))
        except Exception:
            raise CannotReproduce(f"{name} v{version} was trained (MLflow run {training_run_id}) before graft recorded "
                                  "lineage (params.yaml, dvc.lock and the diff of a dirty tree as run artifacts); "
                                  "versions registered from now on can be reproduced") from None  # fmt: skip
        params_yaml = (folder / "params.yaml").read_bytes()
        lock = yaml.safe_load((folder / "dvc.lock").read_text()) if (folder / "dvc.lock").is_file() else {}
        diff = (folder / "git.diff").read_bytes() if (folder / "git.diff").is_file() else None
        metrics = _evaluation_metrics(client, [mv.run_id, training_run_id], Path(tmp))
    if commit == "unknown" or not lock.get("stages", {}).get("ingest"):
        raise CannotReproduce(f"{name} v{version}: its lineage has no git commit or no data snapshot hash")
    return Lineage(name=name, version=version, commit=commit, training_run_id=training_run_id,
                   evaluation_run_id=mv.run_id, params_yaml=params_yaml, lock=lock, diff=diff,
                   pretrained_sha256=run.data.tags.get("pretrained_weights_sha256", "none"),
                   weights_sha256=run.data.tags.get(tracking.WEIGHTS_TAG), metrics=metrics,
                   params=dict(run.data.params), cpu_kernels=run.data.tags.get(kernels.TAG),
                   threads=run.data.tags.get(threads.TAG), torch=run.data.tags.get(kernels.TORCH_TAG))  # fmt: skip


def _evaluation_metrics(client, run_ids: list[str], tmp: Path) -> dict[str, Any]:
    """The evaluate stage's metrics.json as logged with the version's run, or with the run
    that trained it (a version registered from a cached model has a run of its own)."""
    from mlflow.artifacts import download_artifacts  # MLflow: imported where used

    for run_id in dict.fromkeys(run_ids):
        try:
            path = download_artifacts(run_id=run_id, artifact_path="evaluation/metrics.json", dst_path=str(tmp / run_id))
            return json.loads(Path(path).read_text())
        except Exception:
            continue
    logged = client.get_run(run_ids[0]).data.metrics  # the figures themselves ('/' in a class name became '_')
    metrics: dict[str, Any] = {k.removeprefix("test_"): v for k, v in logged.items() if k.startswith("test_") and not k.startswith("test_f1_")}
    metrics["per_class_f1"] = {k.removeprefix("test_f1_"): v for k, v in logged.items() if k.startswith("test_f1_")}
    return metrics


# --- rebuilding the inputs -----------------------------------------------------------------


def _git(root: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, input=input)


def make_worktree(root: Path, lineage: Lineage, dest: Path) -> Path:
    """A detached worktree at the version's commit, its diff applied, its params.yaml and
    dvc.lock written, using this project's DVC cache and remote."""
    if _git(root, "cat-file", "-e", f"{lineage.commit}^{{commit}}").returncode != 0:
        raise CannotReproduce(f"commit {lineage.commit[:12]} of {lineage.name} v{lineage.version} is not in this "
                              "repository: `git fetch` the branch it was made on (or `git fetch --all`), then retry")  # fmt: skip
    added = _git(root, "worktree", "add", "--detach", str(dest), lineage.commit)
    if added.returncode != 0:
        raise GraftError(f"git worktree add failed: {added.stderr.decode(errors='replace').strip()}")
    if lineage.diff:
        applied = _git(dest, "apply", "--binary", "--whitespace=nowarn", "-", input=lineage.diff)
        if applied.returncode != 0:
            raise CannotReproduce(f"the uncommitted changes recorded with v{lineage.version} do not apply to commit "
                                  f"{lineage.commit[:12]}: {applied.stderr.decode(errors='replace').strip()}")  # fmt: skip
    (dest / "params.yaml").write_bytes(lineage.params_yaml)
    (dest / "dvc.lock").write_text(yaml.safe_dump(lineage.lock, sort_keys=False))
    # Where data lives is this project's business, not the commit's: its DVC config and cache.
    for name in ("config", "config.local"):
        if (root / ".dvc" / name).is_file():
            shutil.copy2(root / ".dvc" / name, dest / ".dvc" / name)
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "cache.dir", str(_cache_dir(root))], cwd=dest,
                   check=True, capture_output=True)  # fmt: skip
    return dest


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def restore_inputs(worktree: Path, lineage: Lineage, echo: Callable[[str], None]) -> list[str]:
    """Check the data snapshot out of the local cache, else the DVC remote, then verify
    every file against the recorded hashes; return the outputs restored."""
    env = _env(worktree)
    stages = [s for s in RESTORED_STAGES if s in lineage.lock["stages"]]
    outs = [o for s in stages for o in lineage.lock["stages"][s].get("outs", [])]
    checkout = subprocess.run([sys.executable, "-m", "dvc", "checkout", *stages], cwd=worktree, env=env,
                              capture_output=True, text=True)  # fmt: skip
    if checkout.returncode != 0:
        echo("  not all in the local cache: pulling from the DVC remote")
        pulled = subprocess.run([sys.executable, "-m", "dvc", "pull", *stages], cwd=worktree, env=env,
                                capture_output=True, text=True)  # fmt: skip
        if pulled.returncode != 0:
            missing = ", ".join(f"{o['path']} (md5 {o.get('md5', '?')})" for o in outs)
            raise CannotReproduce(f"the data of {lineage.name} v{lineage.version} ({missing}) is in neither this "
                                  "project's DVC cache nor its DVC remote; `dvc remote add -d NAME URL` for the remote "
                                  f"it was pushed to. DVC said: {_last_line(pulled.stderr or pulled.stdout)}")  # fmt: skip
    for out in outs:
        verify_output(worktree, out, _cache_dir(worktree))
    return [o["path"] for o in outs]


def _cache_dir(repo: Path) -> Path:
    """The DVC cache ``repo`` uses (its config, the global one, or the default)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=repo, capture_output=True, text=True)
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else repo / ".dvc" / "cache"


def cache_object(cache_dir: Path, md5: str) -> Path:
    """Where DVC 3 keeps the object of ``md5`` (a file, or a directory's ``.dir`` manifest)."""
    return cache_dir / "files" / "md5" / md5[:2] / md5[2:]


def verify_output(worktree: Path, out: dict[str, Any], cache_dir: Path) -> None:
    """Recompute the md5 of every file of an output and compare with the lock (a directory:
    with its manifest in the cache), so a damaged cache object is caught, not trained on."""
    path, md5 = worktree / out["path"], str(out.get("md5", ""))
    if not md5.endswith(".dir"):
        if not path.is_file() or _md5(path) != md5:
            raise CannotReproduce(f"data hash mismatch: {out['path']} does not match its recorded md5 {md5} (the DVC cache "
                                  "object is damaged or was changed); remove it from .dvc/cache and `dvc pull` a good copy")  # fmt: skip
        return
    manifest = cache_object(cache_dir, md5)
    entries = json.loads(manifest.read_text())
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    if files != sorted(e["relpath"] for e in entries):
        raise CannotReproduce(f"data hash mismatch: the files of {out['path']} differ from its recorded manifest {md5}")
    for e in entries:
        if _md5(path / e["relpath"]) != e["md5"]:
            raise CannotReproduce(f"data hash mismatch: {out['path']}/{e['relpath']} does not match its recorded md5 "
                                  f"{e['md5']} (the DVC cache object is damaged or was changed); remove it from "
                                  ".dvc/cache and `dvc pull` a good copy")  # fmt: skip


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing)"


def _env(worktree: Path, reproduction_of: str | None = None) -> dict[str, str]:
    """The environment for DVC and the stages in the worktree: this project's MLflow store
    and experiment, no flow run to nest under, the commit's code first on the path."""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    env = {**os.environ, "PYTHONPATH": str(worktree), "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_EXPERIMENT_NAME": tracking.experiment_name()}  # fmt: skip
    for key in (tracking.PARENT_RUN_ENV, tracking.FLOW_RUN_ENV, STATUS_ENV):
        env.pop(key, None)
    if reproduction_of:
        env[tracking.REPRODUCTION_ENV] = reproduction_of
    # dvc.yaml's stages call `python -m ...`: this interpreter's environment first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def rerun(worktree: Path, lineage: Lineage, echo: Callable[[str], None]) -> None:
    """Run every stage after the data snapshot again, whatever DVC's caches hold."""
    env = _env(worktree, f"{lineage.name}/{lineage.version}")
    here = kernels.current()
    pinned = kernels.pin_env(lineage.cpu_kernels, here)
    if pinned:
        env.update(pinned)
        echo(f"  CPU kernels: {lineage.cpu_kernels}, as at training (this CPU has {here}): "
             + ", ".join(f"{k}={v}" for k, v in pinned.items()))  # fmt: skip
    elif lineage.cpu_kernels and lineage.cpu_kernels != here:
        echo(f"  CPU kernels: trained with {lineage.cpu_kernels}, this CPU runs {here} and cannot be pinned to "
             "it: expect figures within tolerance, not identical weights")  # fmt: skip
    env.update(thread_pin(lineage.threads, env.get(threads.FORCE_ENV), echo))
    for stage in RERUN_STAGES:
        echo(f"  {stage}...")
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--no-run-cache", "--single-item", stage],
                              cwd=worktree, env=env, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            detail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise CannotReproduce(f"stage {stage} failed in the reproduction (commit {lineage.commit[:12]}):\n{detail}")


def thread_pin(recorded: str | None, forced: str | None, echo: Callable[[str], None]) -> dict[str, str]:
    """The environment that reruns the training at its recorded thread pool, step for step
    (the same seeded training adds up in other orders at another count: other last bits,
    other figures). A count the user forces (``GRAFT_THREADS``) wins, with a word on it."""
    pool = threads.recorded_pool(recorded)
    if pool is None:
        return {}
    n, changed = pool
    schedule = threads.recorded_schedule(recorded)
    if forced and (changed or forced.strip() != str(n)):
        echo(f"  torch threads: {forced.strip()}, as {threads.FORCE_ENV} forces (the training ran at {recorded}): "
             "expect figures within tolerance, not identical weights")  # fmt: skip
        return {}
    if changed and schedule is None:  # recorded in seconds, before graft kept the steps
        echo(f"  torch threads: {n} throughout; the training started with {n} but re-sized its pool to the machine's "
             f"load ({recorded}): expect figures within tolerance, not identical weights")  # fmt: skip
        return {threads.FORCE_ENV: str(n)}
    if changed:
        echo(f"  torch threads: as at training, replayed step for step ({threads.SCHEDULE_ENV}={recorded})")
        return {threads.SCHEDULE_ENV: threads.describe_schedule(schedule or [])}
    echo(f"  torch threads: {n}, as at training ({threads.FORCE_ENV}={n})")
    return {threads.FORCE_ENV: str(n)}


# --- comparing -------------------------------------------------------------------------------


def _outs(lock: dict[str, Any], stage: str) -> dict[str, str]:
    return {o["path"]: str(o.get("md5", "?")) for o in lock.get("stages", {}).get(stage, {}).get("outs", [])}


def _exact(what: str, original: str | None, reproduced: str | None) -> Row:
    status = IDENTICAL if original is not None and original == reproduced else DIFFERS
    return Row(what, original or "unknown", reproduced or "unknown", status)


def _figure(what: str, original: float | None, reproduced: float | None, tolerance: float) -> Row:
    if original is None or reproduced is None:
        return Row(what, "unknown" if original is None else f"{original:.6f}",
                   "unknown" if reproduced is None else f"{reproduced:.6f}", DIFFERS)  # fmt: skip
    if original == reproduced:
        status = IDENTICAL
    elif abs(original - reproduced) <= tolerance:
        status = WITHIN
    else:
        status = DIFFERS
    return Row(what, f"{original:.6f}", f"{reproduced:.6f}", status)


def compare(lineage: Lineage, worktree: Path, client) -> tuple[list[Row], str]:
    """One row per input and result; the reproduction's MLflow run id."""
    rows: list[Row] = []
    new_lock = yaml.safe_load((worktree / "dvc.lock").read_text())
    for stage in (*RESTORED_STAGES, "preprocess", "load_pretrained"):
        new = _outs(new_lock, stage)
        for path, md5 in _outs(lineage.lock, stage).items():
            rows.append(_exact(f"data {path}" if path.startswith("data/") else f"{stage} {path}", md5, new.get(path)))
    run_id = fsio.read_json(worktree / paths.FINE_TUNED / tracking.RUN_FILE)["run_id"]
    new_run = client.get_run(run_id)
    changed = sorted(k for k in set(lineage.params) | set(new_run.data.params)
                     if lineage.params.get(k) != new_run.data.params.get(k))  # fmt: skip
    rows.append(Row("params (as logged by fine_tune)", f"{len(lineage.params)} values",
                    "same values" if not changed else "differ: " + ", ".join(changed[:5]), IDENTICAL if not changed else DIFFERS))  # fmt: skip
    rows.append(_exact("pretrained weights sha256", lineage.pretrained_sha256, new_run.data.tags.get("pretrained_weights_sha256")))
    rows.append(_exact("fine-tuned weights sha256", lineage.weights_sha256,
                       fsio.sha256_file(worktree / paths.FINE_TUNED / modeling.WEIGHTS)))  # fmt: skip
    rows += environment_rows(lineage, new_run.data.tags)
    new_metrics = json.loads((worktree / paths.METRICS).read_text())
    for key in ("accuracy", "macro_f1", "ece"):
        rows.append(_figure(f"test {key}", _num(lineage.metrics.get(key)), _num(new_metrics.get(key)), TOLERANCE[key]))
    original_f1 = {c.replace("/", "_"): v for c, v in lineage.metrics.get("per_class_f1", {}).items()}
    new_f1 = {c.replace("/", "_"): v for c, v in new_metrics.get("per_class_f1", {}).items()}
    for cls in sorted(set(original_f1) | set(new_f1)):
        rows.append(_figure(f"test F1 {cls}", _num(original_f1.get(cls)), _num(new_f1.get(cls)), TOLERANCE["per_class_f1"]))
    return rows, run_id


ENVIRONMENT = "environment: "  # rows of what ran the training, not what it was given


def environment_rows(lineage: Lineage, tags: dict[str, str]) -> list[Row]:
    """What orders a training's sums besides its inputs: the CPU kernels, the thread pool's
    sizes step by step, torch's version. They explain a verdict; they are not inputs."""

    def schedule(v: str | None):  # "2 (forced)" and "2" ran the same pool
        return threads.recorded_schedule(v) or v

    rows = [_exact(f"{ENVIRONMENT}CPU kernels", lineage.cpu_kernels, tags.get(kernels.TAG)),
            _exact(f"{ENVIRONMENT}torch threads", lineage.threads, tags.get(threads.TAG)),
            _exact(f"{ENVIRONMENT}torch version", lineage.torch, tags.get(kernels.TORCH_TAG))]  # fmt: skip
    if lineage.threads and schedule(lineage.threads) == schedule(tags.get(threads.TAG)):
        rows[1].status = IDENTICAL
    return rows


def why_weights_differ(rows: list[Row]) -> str | None:
    """One line on why a rerun's weights are not the original's, from the environment rows;
    None when they are identical."""
    weights = next((r for r in rows if r.what.startswith("fine-tuned weights")), None)
    if weights is None or weights.status == IDENTICAL:
        return None
    inputs = [r.what for r in rows if r.status != IDENTICAL and not r.what.startswith(("test ", "fine-tuned weights", ENVIRONMENT))]
    env = [f"{r.what.removeprefix(ENVIRONMENT)} {r.original} -> {r.reproduced}"
           for r in rows if r.what.startswith(ENVIRONMENT) and r.status != IDENTICAL]  # fmt: skip
    if inputs:
        return "the weights differ: so do the inputs (" + ", ".join(inputs[:3]) + ")"
    if env:
        return "the weights differ because what ran the training did: " + "; ".join(env)
    return ("the weights differ with the same inputs, CPU kernels, thread schedule and torch version: another CPU "
            "model orders the sums too (docs: How reproducibility works)")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


def verdict(rows: list[Row]) -> str:
    """identical: every row; within tolerance: the inputs identical and every figure within
    tolerance (the weights may differ in the last bits); differs: anything else."""
    if all(r.status == IDENTICAL for r in rows if not r.what.startswith(ENVIRONMENT)):
        return IDENTICAL
    inputs_ok = all(r.status == IDENTICAL for r in rows if not r.what.startswith(("test ", "fine-tuned weights", ENVIRONMENT)))
    if inputs_ok and all(r.status != DIFFERS for r in rows if r.what.startswith("test ")):
        return WITHIN
    return DIFFERS


def table(rows: list[Row]) -> list[str]:
    def short(v: str) -> str:
        return v if len(v) <= 24 else f"{v[:21]}..."

    head = ("", "original", "reproduced", "")
    body = [(r.what, short(r.original), short(r.reproduced), r.status) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(3)]
    return ["  ".join(c.ljust(w) for c, w in zip(x[:3], widths, strict=True)) + "  " + x[3] for x in [head, *body]]


def record(client, lineage: Lineage, outcome: str, run_id: str | None, why: str = "") -> dict[str, Any]:
    """The outcome on the model version (``graft.reproduced``), as ``graft status`` shows it."""
    entry = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "verdict": outcome, "run_id": run_id}
    if why:
        entry["why"] = why[:300]
    client.set_model_version_tag(lineage.name, lineage.version, REPRODUCED_TAG, json.dumps(entry))
    return entry


WORKTREE_PREFIX = "graft-reproduce-"


def clean_stale(root: Path) -> list[str]:
    """Remove what a reproduction killed before its cleanup left (its worktree, a copy of
    the data): those whose process is gone. Returns one line per removal."""

    removed = []
    for base in Path(tempfile.gettempdir()).glob(f"{WORKTREE_PREFIX}*"):
        try:
            pid = int((base / "pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if psutil.pid_exists(pid):
            continue
        _git(root, "worktree", "remove", "--force", str(base / "worktree"))
        shutil.rmtree(base, ignore_errors=True)
        removed.append(f"removed {base}, left by an interrupted reproduction (pid {pid})")
    _git(root, "worktree", "prune")
    return removed


def reproduce(root: Path, client, name: str, version: str, echo: Callable[[str], None], keep: bool = False):
    """Rebuild, rerun, compare, record. Returns (verdict, rows, reproduction run id)."""
    lineage = read_lineage(client, name, version)
    echo(f"reproducing {name} v{version}: commit {lineage.commit[:12]}" + (" + its uncommitted diff" if lineage.diff else "")
         + f", training run {lineage.training_run_id}")  # fmt: skip
    for line in clean_stale(root):
        echo(f"  {line}")
    base = Path(tempfile.mkdtemp(prefix=f"{WORKTREE_PREFIX}v{version}-"))
    (base / "pid").write_text(str(os.getpid()))
    worktree = base / "worktree"
    try:
        make_worktree(root, lineage, worktree)
        echo(f"  worktree {worktree}")
        restored = restore_inputs(worktree, lineage, echo)
        echo(f"  data snapshot restored and verified by hash: {', '.join(restored)}")
        rerun(worktree, lineage, echo)
        rows, run_id = compare(lineage, worktree, client)
        outcome = verdict(rows)
        record(client, lineage, outcome, run_id)
        return outcome, rows, run_id
    except CannotReproduce as e:
        try:
            record(client, lineage, "cannot reproduce", None, str(e))
        except Exception:
            pass  # a read-only user: the message still says it
        raise
    finally:
        if keep:
            echo(f"  kept {worktree} (git worktree remove --force {worktree} when done)")
        else:
            _git(root, "worktree", "remove", "--force", str(worktree))
            shutil.rmtree(base, ignore_errors=True)
            _git(root, "worktree", "prune")
