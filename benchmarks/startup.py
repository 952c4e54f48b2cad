"""Benchmark what graft's stages cost besides training: each stage's CPU on a tiny slice,
this checkout against a baseline commit, in one run.

On a tiny slice (12 training and 4 test images a class, 32 px, two epochs of partial
fine-tuning: about 2 s of training) a stage's CPU is almost all start-up: importing
torch, timm, MLflow, Great Expectations, scikit-learn, opening the MLflow store. Users
pay it on every run, and the test suite on every pipeline it runs.

For the baseline (default: ``be17d35``, the commit before the library redesign) and for
this checkout, a fresh project copy (``git archive`` of the commit; this checkout's
tracked and untracked files) runs every stage by its own ``dvc.yaml`` command, in order,
at one torch thread; each stage's CPU (user + system, the kernel's figure for that
process and its children) is read with ``wait4``. The two alternate, ``--rounds`` times
each, and the medians are compared: ``ratio`` is this checkout's CPU over the baseline's.
Caches a stage keeps between runs (timm's preprocessing config) are warm, as on a
user's second run.

Usage: python benchmarks/startup.py [--baseline be17d35] [--rounds 3] [--json benchmarks/results-cpu.json]
(the figures go under the key "startup"; the file's other keys are kept).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.memory import stage_command  # noqa: E402  (after the path is set)
from benchmarks.transfer import machine_info  # noqa: E402

BASELINE = "be17d35"
TINY = {
    "ingest": {"max_train_per_class": 12, "max_test_per_class": 4},
    "preprocess": {"image_size": 32},
    "fine_tune": {"epochs": 2, "batch_size": 16, "mode": "partial", "frozen_groups": 4},
    "register": {"min_accuracy": 0.0},
}
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@localhost"}  # fmt: skip


def checkout(rev: str | None, dest: Path) -> Path:
    """A project at ``rev`` (None: this checkout's files as git sees them), as a git
    repository of one commit with the tiny params."""
    import yaml

    dest.mkdir(parents=True)
    if rev is None:
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
        for rel in files:
            if (ROOT / rel).is_file() and not rel.startswith("reports/"):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    (dest / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **GIT_ENV}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def stages_of(project: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


def run_pipeline(project: Path) -> dict[str, float]:
    """Every stage once, in dvc.yaml's order: {stage: CPU seconds}."""
    env = {**os.environ, "PYTHONPATH": str(project), "GRAFT_THREADS": "1", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns' / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    cpu = {}
    for stage in stages_of(project):
        log = project / ".graft" / f"bench-{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            proc = subprocess.Popen(stage_command(project, stage), cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if proc.returncode != 0:
            raise SystemExit(f"{project}: stage {stage} exited {proc.returncode}; its log: {log}\n{log.read_text()[-3000:]}")
        cpu[stage] = usage.ru_utime + usage.ru_stime
    return cpu


def measure(baseline: str, rounds: int) -> dict:
    from graft.modalities.backbone import preprocessing_config

    preprocessing_config("tf_efficientnet_lite0")  # the cache a user's second run finds warm
    base = Path(tempfile.mkdtemp(prefix="graft-bench-startup-"))
    try:
        runs: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        for r in range(rounds):
            for label, rev in (("baseline", baseline), ("current", None)):
                project = checkout(rev, base / f"{label}-{r}")
                t0 = time.perf_counter()
                runs[label].append(run_pipeline(project))
                total = sum(runs[label][-1].values())
                print(f"round {r + 1}/{rounds}, {label}: {total:.1f} s of CPU ({time.perf_counter() - t0:.0f} s)", flush=True)
                shutil.rmtree(project, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    stages = list(dict.fromkeys([*runs["baseline"][0], *runs["current"][0]]))
    median = {label: {s: statistics.median(run.get(s, 0.0) for run in rs) for s in stages} for label, rs in runs.items()}
    before, after = sum(median["baseline"].values()), sum(median["current"].values())
    return {
        "machine": machine_info(),
        "baseline": subprocess.run(["git", "rev-parse", "--short", baseline], cwd=ROOT, check=True, capture_output=True,
                                   text=True).stdout.strip(),  # fmt: skip
        "rounds": rounds,
        "settings": TINY,
        "stages": {s: {"baseline_cpu_s": median["baseline"][s], "cpu_s": median["current"][s]} for s in stages},
        "total": {"baseline_cpu_s": before, "cpu_s": after, "ratio": after / before},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="the commit to compare with (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="pipelines per side, alternating (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="results file to add the figures to, under 'startup'")
    args = ap.parse_args()
    result = measure(args.baseline, args.rounds)
    print(f"\n{'stage':16} {'baseline':>9} {'now':>9} {'ratio':>6}   (CPU seconds, median of {args.rounds})")
    for stage, s in result["stages"].items():
        ratio = s["cpu_s"] / s["baseline_cpu_s"] if s["baseline_cpu_s"] else float("nan")
        print(f"{stage:16} {s['baseline_cpu_s']:9.1f} {s['cpu_s']:9.1f} {ratio:6.2f}")
    t = result["total"]
    print(f"{'all stages':16} {t['baseline_cpu_s']:9.1f} {t['cpu_s']:9.1f} {t['ratio']:6.2f}")
    if args.json:
        data = json.loads(args.json.read_text()) if args.json.exists() else {}
        data["startup"] = result
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
