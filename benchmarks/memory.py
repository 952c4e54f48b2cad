"""Benchmark graft's memory as the data grows, on this machine, in one run.

1. **Peak resident memory per stage at N and 4N images.** Fashion-MNIST at N (default
   15,000: 1,200 train + 300 test images per class) and 4N (60,000: 5,000 + 1,000), each
   in a fresh copy of the project with the default params (one epoch: peak memory does
   not depend on how many). Every stage runs its own ``dvc.yaml`` command; its peak
   resident set comes from the kernel (``wait4``'s ``ru_maxrss`` of that process).
2. **fine_tune under a memory limit below its data.** N images at 256 px (2.7 GB
   prepared), feature extraction: ``fine_tune`` once without a limit, then again inside
   a memory cgroup limited to 1.25 GB (no swap here): same weights (sha256), same
   validation accuracy.
3. **Reading from disk costs nothing measurable.** graft's training loop on the default
   data read from disk a batch at a time (what the stage does) against the same loop on
   the split loaded into memory (what it did before), alternating rounds, medians.
4. **Would DataLoader workers pay?** The share of a training step spent preparing the
   batch (reading rows, augmenting, making the tensor): the most a worker process could
   hide, before it takes one of the two cores from the model.

Usage: python benchmarks/memory.py [--n 15000] [--json benchmarks/results-cpu.json]
(the figures go under the key "memory"; the file's other keys are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("scaling", "limited", "disk")
MEASURED = ("ingest", "validate", "preprocess", "load_pretrained", "teach", "fine_tune", "evaluate")
SIZE_LIMITED = 256  # px: the images of the run under a memory limit
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


def stage_command(project: Path, stage: str) -> list[str]:
    """The stage's command as ``dvc.yaml`` has it, with this interpreter for ``python``."""
    import yaml

    cmd = shlex.split(yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    return [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int):
    """A fresh memory cgroup limited to ``limit_bytes`` (swap included where the kernel
    counts it); yields the file a process writes its pid into to join it. Needs root and
    a writable cgroup hierarchy (v1 or v2); raises OSError where there is none."""
    name = f"graft-{os.getpid()}-{time.monotonic_ns()}"
    if (CGROUP_V2 / "cgroup.controllers").is_file():
        group = CGROUP_V2 / name
        group.mkdir()
        (group / "memory.max").write_text(str(limit_bytes))
        with contextlib.suppress(OSError):
            (group / "memory.swap.max").write_text("0")
    else:
        group = CGROUP_V1 / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        with contextlib.suppress(OSError):  # absent without swap accounting
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    try:
        yield group / "cgroup.procs"
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def cgroups_available() -> str | None:
    """None if this process can make a memory cgroup, else why not."""
    try:
        with memory_cgroup(1 << 30):
            return None
    except OSError as e:
        return f"no writable memory cgroup here ({e.strerror}: {e.filename})"


def run_stage(project: Path, stage: str, env: dict[str, str], cgroup_procs: Path | None = None) -> dict:
    """Run one stage's command; its exit code, peak resident memory (MB, the kernel's
    figure for that process) and seconds. Its output goes to ``.graft/bench-<stage>.log``."""
    log = project / ".graft" / f"bench-{stage}.log"
    log.parent.mkdir(parents=True, exist_ok=True)

    def join_cgroup() -> None:  # in the child, before exec: the stage is born limited
        if cgroup_procs is not None:
            cgroup_procs.write_text(str(os.getpid()))

    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(stage_command(project, stage), cwd=project, env=env, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=join_cgroup)  # fmt: skip
        anon = AnonSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        anon.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return {"returncode": proc.returncode, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": anon.peak_kb / 1024,
            "seconds": time.perf_counter() - t0, "log": str(log)}  # fmt: skip


class AnonSampler:
    """The peak of a process's anonymous resident memory (``RssAnon``: its heap, arrays
    and tensors), sampled every few milliseconds from ``/proc``.

    The kernel's peak (``ru_maxrss``) also counts the pages of shared libraries it has
    mapped: ``import torch`` alone peaks at 650 MB here, and how much of a library gets
    mapped depends on what the page cache holds, so the same stage at the same size
    varied by 30 MB between runs. Data a stage loads is anonymous memory, held for the
    stage's life, so the sampled anonymous peak sees it and little else."""

    def __init__(self, pid: int, interval: float = 0.005):
        import threading

        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self._done.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                            break
            except OSError:
                return
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_stages(project: Path, stages=MEASURED) -> dict[str, dict]:
    from tests.conftest import project_env

    env = project_env(project)
    # One thread count at both sizes: each thread's buffers are memory too, and the sizer's
    # choice (graft/base/threads.py) depends on what else runs, this sampler included.
    env.setdefault("GRAFT_THREADS", str(len(os.sched_getaffinity(0))))
    # Every block over 64 KB mmapped and returned to the kernel when freed: the peak is
    # then what the stage held at once. With glibc's moving threshold, freed blocks stay
    # in the heap in a pattern that differs between runs: evaluate's peak at the same size
    # varied by 80 MB (798 to 879), by 1 MB with this; it is a measurement setting.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    out = {}
    for stage in stages:
        r = out[stage] = run_stage(project, stage, env)
        if r["returncode"] != 0:
            raise RuntimeError(f"{stage} failed ({r['returncode']}):\n" + Path(r["log"]).read_text()[-3000:])
    return out


def prepared_bytes(project: Path) -> int:
    return sum(f.stat().st_size for f in (project / "data" / "prepared").glob("*_x.npy"))


def make_project(dest: Path, train_per_class: int, test_per_class: int, **sections) -> Path:
    from tests.conftest import copy_project, set_params

    project = copy_project(dest)
    ingest = {"max_train_per_class": train_per_class, "max_test_per_class": test_per_class, **sections.pop("ingest", {})}
    fine_tune = {"epochs": 1, **sections.pop("fine_tune", {})}
    set_params(project, ingest=ingest, fine_tune=fine_tune, **sections)
    return project


def fine_tune_outcome(project: Path) -> dict:
    from graft.base import fsio

    model = project / "models" / "fine_tuned"
    training = fsio.read_json(model / "model.json")["training"]
    return {"weights_sha256": fsio.sha256_file(model / "weights.pt"), "best_val_accuracy": training["best_val_accuracy"]}


def scaling(n: int, work: Path) -> dict:
    """(1): every stage's peak memory at N and 4N images, default params, one epoch."""
    per_class = {"N": (n * 4 // 50, n // 50), "4N": (n * 4 * 4 // 50, n * 4 // 50)}  # 80 % train, 20 % test
    sizes = {}
    for label, (tr, te) in per_class.items():
        project = make_project(work / label, tr, te)
        t0 = time.perf_counter()
        stages = run_stages(project)
        samples = prepared_samples(project)
        sizes[label] = {"images": samples, "prepared_mb": prepared_bytes(project) / 2**20, "stages": stages,
                        "seconds": time.perf_counter() - t0}  # fmt: skip
        print(f"   {label}: {samples} images, prepared {sizes[label]['prepared_mb']:.0f} MB; peak RSS / anonymous MB: "
              + ", ".join(f"{s} {r['peak_rss_mb']:.0f}/{r['peak_anon_mb']:.0f}" for s, r in stages.items()), flush=True)  # fmt: skip
    small, large = sizes["N"]["stages"], sizes["4N"]["stages"]
    extra = sizes["4N"]["images"] - sizes["N"]["images"]
    return {"sizes": sizes,
            "ratios": {s: large[s]["peak_rss_mb"] / small[s]["peak_rss_mb"] for s in MEASURED},
            "anon_ratios": {s: large[s]["peak_anon_mb"] / small[s]["peak_anon_mb"] for s in MEASURED},
            # what each extra sample costs a stage (its manifest row, its label...), in KB
            "kb_per_extra_sample": {s: (large[s]["peak_anon_mb"] - small[s]["peak_anon_mb"]) * 1024 / extra for s in MEASURED}}  # fmt: skip


def limited(n: int, work: Path, limit_mb: int) -> dict:
    """(2): fine_tune with a memory limit below its data, against the same run without.

    Prepared data more than twice the limit: N images at 256 px (192 KB each). Feature
    extraction at batch 8 keeps the stage's own needs (libraries, model, one batch: 810
    MB of anonymous memory here) under the limit, so only holding the data could break it."""
    why_not = cgroups_available()
    if why_not:
        return {"skipped": why_not}
    from tests.conftest import project_env

    project = make_project(work / "limited", n * 4 // 50, n // 50, preprocess={"image_size": SIZE_LIMITED},
                           fine_tune={"mode": "feature_extraction", "epochs": 2, "batch_size": 8, "eval_batch_size": 8})  # fmt: skip
    unlimited = run_stages(project, MEASURED[:-1])["fine_tune"]
    first = fine_tune_outcome(project)
    data_mb = prepared_bytes(project) / 2**20
    with memory_cgroup(limit_mb * 2**20) as procs:
        r = run_stage(project, "fine_tune", project_env(project), procs)
        # The group's own peak (process and page cache): at the limit, the kernel was
        # taking the page cache back while training read on.
        peak = next((procs.parent / f for f in ("memory.max_usage_in_bytes", "memory.peak") if (procs.parent / f).is_file()), None)
        group_peak_mb = int(peak.read_text()) / 2**20 if peak else None
    if r["returncode"] != 0:
        raise RuntimeError(f"fine_tune under {limit_mb} MB failed ({r['returncode']}):\n" + Path(r["log"]).read_text()[-3000:])
    second = fine_tune_outcome(project)
    out = {"limit_mb": limit_mb, "prepared_mb": data_mb, "limit_over_data": limit_mb / data_mb, "images": prepared_samples(project),
           "image_size": SIZE_LIMITED, "peak_rss_mb": r["peak_rss_mb"], "peak_anon_mb": r["peak_anon_mb"], "seconds": r["seconds"],
           "unlimited_peak_rss_mb": unlimited["peak_rss_mb"], "unlimited_seconds": unlimited["seconds"],
           "group_peak_mb": group_peak_mb,
           "same_weights": second["weights_sha256"] == first["weights_sha256"],
           "val_accuracy": second["best_val_accuracy"], "unlimited_val_accuracy": first["best_val_accuracy"]}  # fmt: skip
    print(f"   fine_tune on {data_mb:.0f} MB of prepared data under a {limit_mb} MB limit: done in {r['seconds']:.0f}s "
          f"(unlimited {unlimited['seconds']:.0f}s), the group's peak {group_peak_mb:.0f} MB, same weights: {out['same_weights']}",
          flush=True)  # fmt: skip
    return out


def prepared_samples(project: Path) -> int:
    return sum(len(np.load(project / "data" / "prepared" / f"{s}_y.npy")) for s in ("train", "val", "test"))


def disk_vs_memory(work: Path) -> dict:
    """(3) and (4) on the default data and params (partial fine-tuning, 64 px)."""
    from benchmarks.transfer import ROUNDS, prepare, scratch_assets, splits, throughput_figures
    from graft.config.params import FineTuneParams, IngestParams, LoadPretrainedParams, PreprocessParams, load_section
    from graft.models.pretrained import load_pretrained
    from graft.training.fine_tune import Split, epoch_order, train

    backbone = load_section(LoadPretrainedParams, "load_pretrained")
    ft = replace(load_section(FineTuneParams, "fine_tune"), device="cpu", epochs=1, patience=99)
    prepared = prepare(work / "default", load_section(IngestParams, "ingest"), load_section(PreprocessParams, "preprocess"),
                       backbone.architecture)  # fmt: skip
    tr, va, _ = splits(prepared)
    in_memory = Split(np.asarray(tr.x), tr.y)
    small_val = Split(va.x[:64], va.y[:64])
    disk_runs: list[float] = []
    memory_runs: list[float] = []
    for r in range(ROUNDS):
        for which in ("disk", "memory") if r % 2 == 0 else ("memory", "disk"):
            model, cfg = load_pretrained(backbone, prepared, scratch_assets(), 0)
            split = tr if which == "disk" else in_memory
            ips = train(model, cfg, split, small_val, ft).history[0]["samples_per_second"]
            (disk_runs if which == "disk" else memory_runs).append(ips)
    figures = throughput_figures(disk_runs, memory_runs)
    throughput = {"disk_images_per_second": figures["graft_images_per_second"],
                  "memory_images_per_second": figures["plain_loop_images_per_second"], "ratio": figures["ratio"],
                  "spread": figures["spread"], "disk_runs": disk_runs, "memory_runs": memory_runs,
                  "images": len(tr.y), "mode": ft.mode}  # fmt: skip
    print(f"   from disk {throughput['disk_images_per_second']:.0f} img/s vs in memory "
          f"{throughput['memory_images_per_second']:.0f} img/s: ratio {throughput['ratio']:.3f} "
          f"(spread {throughput['spread']:.1%})", flush=True)  # fmt: skip

    # (4) What a worker would take off the step: read + augment + to tensor, timed alone,
    # over one epoch's batches in graft's order.
    from graft.models import modeling

    model, cfg = load_pretrained(backbone, prepared, scratch_assets(), 0)
    order, rng = epoch_order(len(tr.y), ft.seed, 0)
    t0 = time.perf_counter()
    for b in range(0, len(order), ft.batch_size):
        idx = np.sort(order[b : b + ft.batch_size])
        batch = cfg.kind.augment(tr.x[idx], rng, ft)
        modeling.to_input(batch, cfg, modeling.resolve_device("cpu"), ft.channels_last)
    prep_seconds = time.perf_counter() - t0
    step_seconds = len(tr.y) / throughput["disk_images_per_second"]
    prep = {"prepare_seconds_per_epoch": prep_seconds, "train_seconds_per_epoch": step_seconds,
            "share_of_step": prep_seconds / step_seconds}  # fmt: skip
    print(f"   batch preparation: {prep_seconds:.2f}s of a {step_seconds:.1f}s epoch "
          f"({prep['share_of_step']:.1%}): the most a DataLoader worker could hide", flush=True)  # fmt: skip
    return {"throughput": throughput, "batch_preparation": prep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=15000, help="N images (default 15,000; 4N = 60,000 is all of Fashion-MNIST)")
    parser.add_argument("--limit-mb", type=int, default=1280, help="the memory limit of run (2), in MB (default 1280)")
    parser.add_argument("--only", choices=SECTIONS, nargs="+", help="run only these sections")
    parser.add_argument("--json", type=Path, help="add the figures to this JSON file under 'memory' (atomically)")
    args = parser.parse_args()
    from benchmarks.transfer import machine_info
    from graft.base import fsio

    sections = set(args.only or SECTIONS)
    out: dict = {"machine": machine_info(), "n": args.n}
    with tempfile.TemporaryDirectory(prefix="graft-bench-memory-") as tmp:
        if "scaling" in sections:
            print("1. peak memory per stage at N and 4N", flush=True)
            out.update(scaling(args.n, Path(tmp)))
        if "limited" in sections:
            print("2. fine_tune under a memory limit below its data", flush=True)
            out["limited"] = limited(args.n, Path(tmp), args.limit_mb)
        if "disk" in sections:
            print("3-4. training from disk vs in memory; batch preparation's share", flush=True)
            out.update(disk_vs_memory(Path(tmp)))
    print(json.dumps({k: v for k, v in out.items() if k != "sizes"}, indent=2))
    if args.json:
        results = fsio.read_json(args.json) if args.json.is_file() else {}
        # --only: the other sections keep their figures (and the machine line the newest run's)
        fsio.write_json(args.json, {**results, "memory": {**results.get("memory", {}), **out}})


if __name__ == "__main__":
    main()
