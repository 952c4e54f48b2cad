"""Not wasting the machine: concurrent trainings, a no-op run, the allocator, serving, two ranks.

Each figure is a ratio against a baseline measured in the same run, on this machine:

- concurrency: the default fine-tune recipe (params.yaml, the project's data/prepared and
  models/pretrained) on its first TRAIN_IMAGES training images, one epoch, as separate
  processes: one alone; two at once with graft's thread sizing (graft/base/threads.py); two
  at once with each pool forced to the machine's core count (torch's own default, what
  graft did before). Target: each concurrent training at >= 0.4x of alone;
- no-op run: `graft run` with nothing changed, against `dvc repro`'s own no-op, without
  graft's servers (Prefect's temporary server starts and stops inside) and with them up
  (`graft server start`);
- serving: the champion's pyfunc (PNG bytes in a DataFrame -> decode, resize, forward)
  against the bare model's forward on already-decoded tensors, at batch 64 (images/s) and
  batch 1 (p50/p95 ms), timed in alternating rounds, and where the pyfunc's time goes;
- allocator: the fine-tuned model's forward pass (batch 64) in fresh processes, with the
  C heap kept for the next batch (graft/base/allocator.py) and with glibc's defaults
  (GRAFT_ALLOCATOR=default), alternating;
- torchrun: the same one-epoch training as one process and as two gloo ranks.

Usage: python benchmarks/machine.py [--json benchmarks/results-cpu.json]
(needs a finished default run: `make run`)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TRAIN_IMAGES = 1920  # 30 batches of the default 64: about 10 s alone here
REPEATS = 3  # of the no-op runs; the median is kept
FORWARD_BATCH, FORWARD_CALLS = 64, 30  # the allocator's figure: one process's inference
ALLOCATOR_ROUNDS = 4  # fresh processes each way; the medians are kept


def child_train(out: Path) -> None:
    """One process's training (run by the benchmark as a subprocess, or under torchrun)."""
    from dataclasses import replace

    from graft.base import distributed, threads
    from graft.config.params import FineTuneParams, load_section
    from graft.data.splits import load_split
    from graft.models import modeling
    from graft.training.fine_tune import Split, train

    p = load_section(FineTuneParams, "fine_tune", ROOT / "params.yaml")
    p = replace(p, epochs=1, patience=5)
    model, cfg = modeling.load(ROOT / "models" / "pretrained")
    x, y = load_split(ROOT / "data" / "prepared", "train")
    vx, vy = load_split(ROOT / "data" / "prepared", "val")
    sizer = threads.sizer("bench")
    t0 = time.perf_counter()
    r = train(model, cfg, Split(x[:TRAIN_IMAGES], y[:TRAIN_IMAGES]), Split(vx[:64], vy[:64]), p, threads=sizer)
    if distributed.current().leader:
        out.write_text(json.dumps({"samples_per_second": r.history[0]["samples_per_second"],
                                   "seconds": time.perf_counter() - t0, "threads": sizer.describe()}))  # fmt: skip
    distributed.shutdown()


def child_forward(out: Path) -> None:
    """Inference alone in a fresh process, as `evaluate` and a model server run it: the
    fine-tuned model's forward pass on batches of FORWARD_BATCH test images (images/s).
    The allocator is tuned by the thread sizer unless GRAFT_ALLOCATOR=default."""
    import torch

    from graft.base import allocator, threads
    from graft.data.splits import load_split
    from graft.models import modeling

    threads.sizer("bench")
    model, cfg = modeling.load(ROOT / "models" / "fine_tuned", torch.device("cpu"))
    x, _ = load_split(ROOT / "data" / "prepared", "test")
    batch = modeling.to_input(np.asarray(x[:FORWARD_BATCH]), cfg, torch.device("cpu"), True)
    times = []
    with torch.inference_mode():
        for _ in range(FORWARD_CALLS):
            t0 = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - t0)
    per_call = float(np.median(times[5:]))  # after the first calls' allocations and kernel picks
    out.write_text(json.dumps({"img_s": FORWARD_BATCH / per_call, "allocator": allocator.tune()}))


def heap(tmp: Path) -> dict:
    """The forward pass with the C heap kept (graft/base/allocator.py) against glibc's
    defaults, each in fresh processes, alternating which goes first."""
    runs: dict[str, list[float]] = {"tuned": [], "default": []}
    for r in range(ALLOCATOR_ROUNDS):
        for which in ("default", "tuned") if r % 2 == 0 else ("tuned", "default"):
            out = tmp / f"forward-{which}-{r}.json"
            env = {**os.environ, "GRAFT_ALLOCATOR": which}
            subprocess.run([sys.executable, __file__, "--child-forward", str(out)], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            result = json.loads(out.read_text())
            if (result["allocator"] == "tuned") != (which == "tuned"):
                raise SystemExit(f"allocator benchmark: wanted {which}, the child says {result['allocator']}")
            runs[which].append(result["img_s"])
    r = {"tuned_img_s": float(np.median(runs["tuned"])), "default_img_s": float(np.median(runs["default"])), "runs": runs}
    r["ratio"] = r["tuned_img_s"] / r["default_img_s"]
    print(f"allocator: forward at batch {FORWARD_BATCH}, {r['tuned_img_s']:.0f} img/s with the C heap kept, "
          f"{r['default_img_s']:.0f} with glibc's defaults ({r['ratio']:.2f}x)")
    return r


def trainings(n: int, env_extra: dict[str, str], tmp: Path, tag: str) -> list[dict]:
    env = {**os.environ, **env_extra}
    outs = [tmp / f"{tag}-{i}.json" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(o)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for o in outs]  # fmt: skip
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a benchmark training failed ({tag})")
    return [json.loads(o.read_text()) for o in outs]


def concurrency(tmp: Path) -> dict:
    cores = str(len(os.sched_getaffinity(0)))
    free = {k: v for k, v in os.environ.items() if k != "GRAFT_THREADS"}
    os.environ.clear()
    os.environ.update(free)
    alone = trainings(1, {}, tmp, "alone")[0]
    sized = trainings(2, {}, tmp, "sized")
    unsized = trainings(2, {"GRAFT_THREADS": cores}, tmp, "unsized")
    base = alone["samples_per_second"]
    out = {"alone": alone, "two_sized": sized, "two_unsized": unsized,
           "two_sized_ratio_each": [r["samples_per_second"] / base for r in sized],
           "two_unsized_ratio_each": [r["samples_per_second"] / base for r in unsized]}  # fmt: skip
    print(f"concurrency: alone {base:.0f} img/s; two at once, sized: "
          + ", ".join(f"{x:.2f}x" for x in out["two_sized_ratio_each"])
          + "; two at once, each with the machine's cores: " + ", ".join(f"{x:.2f}x" for x in out["two_unsized_ratio_each"]))
    return out


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def noop() -> dict:
    bin_ = Path(sys.executable).parent
    graft, dvc = [str(bin_ / "graft"), "run"], [str(bin_ / "dvc"), "repro"]
    if "up to date" not in subprocess.run([str(bin_ / "dvc"), "status"], cwd=ROOT, capture_output=True, text=True).stdout:
        raise SystemExit("the no-op benchmark needs an up-to-date pipeline: run `graft run` first")
    out: dict = {}
    for mode in ("without_servers", "with_servers"):
        if mode == "with_servers":
            timed([str(bin_ / "graft"), "server", "start"])
        try:
            runs = [timed(graft) for _ in range(REPEATS)]
            reference = [timed(dvc) for _ in range(REPEATS)]
        finally:
            if mode == "with_servers":
                timed([str(bin_ / "graft"), "server", "stop"])
        g, d = float(np.median(runs)), float(np.median(reference))
        out[mode] = {"graft_run_s": g, "dvc_repro_s": d, "extra_s": g - d}
        print(f"no-op run, {mode.replace('_', ' ')}: graft run {g:.2f} s, dvc repro {d:.2f} s: {g - d:.2f} s more")
    return out


def serving() -> dict:
    import mlflow
    import pandas as pd
    import torch

    from graft.data.splits import load_split
    from graft.modalities.image import _png_bytes
    from graft.models import modeling
    from graft.tracking import runs as tracking

    tracking.configure(ROOT)
    pyfunc = mlflow.pyfunc.load_model("models:/graft-classifier@champion")
    model, cfg = modeling.load(ROOT / "models" / "fine_tuned", modeling.resolve_device("cpu"))
    model.eval()
    x, _ = load_split(ROOT / "data" / "prepared", "test")
    # Raw 28x28 images as a client sends them: PNG bytes of Fashion-MNIST's first 64 test images.
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16)[: 64 * 784].reshape(64, 28, 28)
    frame = pd.DataFrame({"image": [_png_bytes(np.ascontiguousarray(p)) for p in pixels]})
    tensors = modeling.to_input(np.asarray(x[:64]), cfg, torch.device("cpu"), True)

    def clock(fn, repeats: int) -> list[float]:
        fn()
        fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    def interleaved(a, b, rounds: int, per_round: int) -> tuple[list[float], list[float], float]:
        """Both timed in alternating rounds (which goes first alternates too), and the
        median over rounds of a's time over b's: this shared 2-vCPU machine's speed moves
        by 20 % within seconds, and a ratio of neighbouring rounds cancels that drift."""
        times: tuple[list[float], list[float]] = ([], [])
        ratios = []
        for r in range(rounds):
            spent = [0.0, 0.0]
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                t = clock((a, b)[i], per_round)
                times[i].extend(t)
                spent[i] = sum(t)
            ratios.append(spent[0] / spent[1])
        return times[0], times[1], float(np.median(ratios))

    with torch.inference_mode():
        bare64, py64, ratio64 = interleaved(lambda: model(tensors), lambda: pyfunc.predict(frame), 12, 3)
        bare1, py1, _ = interleaved(lambda: model(tensors[:1]), lambda: pyfunc.predict(frame.iloc[:1]), 6, 10)
    enc = pyfunc.unwrap_python_model().encoder
    decode64 = clock(lambda: enc.batch(list(frame["image"])), 10)
    r = {"bare_b64_img_s": 64 / float(np.median(bare64)), "pyfunc_b64_img_s": 64 / float(np.median(py64)),
         "bare_b1_ms_p50": float(np.median(bare1) * 1000), "bare_b1_ms_p95": float(np.percentile(bare1, 95) * 1000),
         "pyfunc_b1_ms_p50": float(np.median(py1) * 1000), "pyfunc_b1_ms_p95": float(np.percentile(py1, 95) * 1000),
         "decode_share_b64": float(np.median(decode64) / np.median(py64))}  # fmt: skip
    r["throughput_ratio"] = ratio64  # pyfunc img/s over bare img/s, round by round
    print(f"serving: pyfunc {r['pyfunc_b64_img_s']:.0f} img/s at batch 64 vs bare forward {r['bare_b64_img_s']:.0f} "
          f"({r['throughput_ratio']:.2f}x; decode and resize {r['decode_share_b64']:.0%} of the pyfunc's time); batch 1: "
          f"pyfunc p50 {r['pyfunc_b1_ms_p50']:.2f} / p95 {r['pyfunc_b1_ms_p95']:.2f} ms, bare p50 {r['bare_b1_ms_p50']:.2f} ms")
    return r


def torchrun(tmp: Path) -> dict:
    one = trainings(1, {}, tmp, "rank-one")[0]
    out = tmp / "ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, "--child", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{proc.stderr[-3000:]}")
    two = json.loads(out.read_text())
    r = {"one_process_img_s": one["samples_per_second"], "two_ranks_img_s": two["samples_per_second"],
         "ratio": two["samples_per_second"] / one["samples_per_second"]}  # fmt: skip
    print(f"torchrun: one process {r['one_process_img_s']:.0f} img/s, two gloo ranks {r['two_ranks_img_s']:.0f} img/s "
          f"({r['ratio']:.2f}x) on {len(os.sched_getaffinity(0))} cores")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="add the figures to this JSON file under 'machine' (atomically)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-forward", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_train(args.child)
    if args.child_forward:
        return child_forward(args.child_forward)
    import tempfile

    from benchmarks.transfer import machine_info
    from graft.base import fsio

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"machine": machine_info(), "concurrency": concurrency(Path(tmp)), "noop_run": noop(),
               "allocator": heap(Path(tmp)), "serving": serving(), "torchrun": torchrun(Path(tmp))}  # fmt: skip
    if args.json:
        results = fsio.read_json(args.json) if args.json.is_file() else {}
        fsio.write_json(args.json, {**results, "machine_use": out})


if __name__ == "__main__":
    main()
