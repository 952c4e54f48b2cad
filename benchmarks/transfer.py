"""Benchmark graft's transfer learning on this machine, in one process.

Prints, each against a baseline measured in the same run:

1. fine-tune throughput (images/s) of graft's training loop against a plain, hand-written
   timm/torch loop on the same model, data, image size and batch size (both channels_last),
   in rounds that alternate which loop goes first, lengthened until the round-to-round
   spread is under 3 %; a ratio within the spread is reported as parity;
2. feature extraction with the cached features against recomputing the frozen backbone:
   per epoch after the first, and end to end (a whole default run, cache build included);
3. test accuracy and fine-tune time of the default params (the quick subset), against
   training the same architecture from ``scratch:`` as a practitioner would (full
   fine-tuning, no LR decay, its own learning rate chosen on the validation split from
   a small sweep): the gain from transfer;
4. test accuracy and fine-tune time on the full dataset (``--full``; about 15 minutes here).

Every field of the JSON it writes is measured or read from the machine (CPU, cores,
versions, date, graft's commit); ``benchmarks/report.py`` turns it into the README's table.

Usage: python benchmarks/transfer.py [--full] [--only SECTION ...] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np

from graft.base import fsio, kernels
from graft.config.params import FineTuneParams, IngestParams, LoadPretrainedParams, PreprocessParams, load_section
from graft.data.snapshot import ingest
from graft.data.splits import load_split, preprocess
from graft.models import modeling
from graft.models.pretrained import load_pretrained
from graft.training.fine_tune import Split, train

SECTIONS = ("throughput", "feature_extraction", "default", "full")
# Throughput rounds: an even number, so each loop goes first equally often; the rounds
# grow from ROUND_IMAGES[0] until both loops vary by less than TARGET_SPREAD.
ROUNDS = 4
ROUND_IMAGES = (1024, 2048, 4096, 7168)
TARGET_SPREAD = 0.03
# Learning rates tried for training from scratch (AdamW, full fine-tuning, no LR decay).
SCRATCH_LRS = (0.5e-3, 2e-3, 8e-3)


def prepare(work: Path, ingest_params: IngestParams, pre_params: PreprocessParams, arch: str) -> Path:
    raw, prepared = work / "raw", work / "prepared"
    raw.mkdir(parents=True)
    prepared.mkdir()
    manifest, classes, _ = ingest(ingest_params, raw)
    preprocess(manifest, list(classes), raw / "samples.tar", pre_params, LoadPretrainedParams(arch, "scratch:" + arch), prepared)
    return prepared


def scratch_assets() -> Path:
    """A throw-away folder for a model's assets (a benchmark saves no model)."""
    return Path(tempfile.mkdtemp(prefix="graft-bench-")) / "assets"


def splits(prepared: Path) -> tuple[Split, Split, Split]:
    return tuple(Split(*load_split(prepared, s)) for s in ("train", "val", "test"))  # type: ignore[return-value]


def fit_and_test(prepared: Path, backbone: LoadPretrainedParams, ft: FineTuneParams) -> dict:
    model, cfg = load_pretrained(backbone, prepared, scratch_assets())
    tr, va, te = splits(prepared)
    t0 = time.perf_counter()
    result = train(model, cfg, tr, va, ft)
    seconds = time.perf_counter() - t0
    probs = modeling.predict_proba(model, te.x, cfg, batch_size=ft.eval_batch_size)
    return {"test_accuracy": float((probs.argmax(1) == te.y).mean()), "val_accuracy": result.best_val_accuracy,
            "fine_tune_seconds": seconds, "epochs": len(result.history), "train_images": len(tr.y),
            "test_images": len(te.y)}  # fmt: skip


def plain_loop_images_per_second(model, cfg, data: Split, batch_size: int, epochs: int, lr: float, device: str = "cpu") -> float:
    """The baseline: the shortest correct timm/torch loop (channels_last, AdamW, no extras).
    On CUDA it does what a practitioner's GPU loop does, as graft's does there: uint8
    batches uploaded then normalised on the GPU, autocast in bf16 where the GPU has it,
    else fp16 with a gradient scaler."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    model.to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    amp = dev.type == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)
    mean = torch.tensor(cfg.input["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(cfg.input["std"], device=dev).view(1, 3, 1, 1)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(data.y))
        for s in range(0, len(order), batch_size):
            idx = np.sort(order[s : s + batch_size])
            x = torch.from_numpy(data.x[idx]).to(dev).permute(0, 3, 1, 2).float().div(255)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=dtype, enabled=amp):
                loss = F.cross_entropy(model(x), torch.from_numpy(data.y[idx]).to(dev))
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    if amp:
        torch.cuda.synchronize()  # the GPU's queue is part of the time
    return epochs * len(data.y) / (time.perf_counter() - t0)


def recompute_run_seconds(model, cfg, train_split: Split, val_split: Split, ft: FineTuneParams, epochs: int) -> list[float]:
    """Feature extraction without a cache: each epoch runs the frozen backbone again, over
    the train split (to train the head) and the val split (to evaluate it), at the batch
    size graft's cache pass uses. Returns each epoch's seconds."""
    import torch
    import torch.nn.functional as F

    model.to(memory_format=torch.channels_last).eval()
    head = model.get_classifier()
    opt = torch.optim.AdamW(head.parameters(), lr=ft.lr)

    def features(x):
        with torch.no_grad():
            return model.forward_head(model.forward_features(modeling.to_input(x, cfg, "cpu")), pre_logits=True)

    seconds = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([ft.seed, epoch]).permutation(len(train_split.y))
        for s in range(0, len(order), ft.batch_size):
            idx = np.sort(order[s : s + ft.batch_size])
            loss = F.cross_entropy(head(features(train_split.x[idx])), torch.from_numpy(train_split.y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.inference_mode():
            for s in range(0, len(val_split.y), ft.batch_size):
                head(features(val_split.x[s : s + ft.batch_size]))
        seconds.append(time.perf_counter() - t0)
    return seconds


def spread(values: list[float]) -> float:
    """Round-to-round spread: (max - min) / median."""
    return float((max(values) - min(values)) / np.median(values))


def machine_info() -> dict:
    """What the figures were measured on, read from the machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": kernels.current(),  # AVX2 or AVX512: the same recipe's figures differ by it (graft/base/kernels.py)
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "timm": metadata.version("timm"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "graft_commit": commit + ("-dirty" if dirty else ""),
    }


def measure_throughput(backbone, meta, tr: Split, va: Split, ft: FineTuneParams, rounds: int = ROUNDS) -> dict:
    """graft's loop against the plain loop: same model, data, size, batch and device
    (``ft.device``), full mode.

    Each round loads fresh models and runs both loops, alternating which goes first (the
    first one pays for warming the allocator and oneDNN's kernels). Rounds are lengthened
    until both loops vary between rounds by less than TARGET_SPREAD, or the train split
    runs out; a ratio closer to 1 than that spread is parity."""
    p = replace(ft, mode="full", epochs=1, hflip=False, crop_padding=0, patience=99, warmup_epochs=0.0)
    small_val = Split(va.x[:64], va.y[:64])
    for size in ROUND_IMAGES:
        n = min(size, len(tr.y))
        sub = Split(tr.x[:n], tr.y[:n])
        plain_runs: list[float] = []
        graft_runs: list[float] = []
        for r in range(rounds):
            for which in ("plain", "graft") if r % 2 == 0 else ("graft", "plain"):
                model, cfg = load_pretrained(backbone, meta, scratch_assets(), 0)
                if which == "plain":
                    plain_runs.append(plain_loop_images_per_second(model, cfg, sub, ft.batch_size, 1, ft.lr, ft.device))
                else:
                    graft_runs.append(train(model, cfg, sub, small_val, p).history[0]["samples_per_second"])
        figures = throughput_figures(graft_runs, plain_runs)
        print(f"   throughput rounds of {n} images: graft {[round(g) for g in graft_runs]}, plain "
              f"{[round(q) for q in plain_runs]}, spread {figures['spread']:.1%}", flush=True)  # fmt: skip
        if figures["spread"] < TARGET_SPREAD or n == len(tr.y):
            break
    return {**figures, "rounds": rounds, "round_images": n}


def throughput_figures(graft_runs: list[float], plain_runs: list[float]) -> dict:
    """Medians, their ratio, the larger of the two loops' round-to-round spreads, and
    whether the ratio is parity (no further from 1 than that spread)."""
    plain, graft_ips = float(np.median(plain_runs)), float(np.median(graft_runs))
    ratio, worst = graft_ips / plain, max(spread(plain_runs), spread(graft_runs))
    return {"graft_images_per_second": graft_ips, "plain_loop_images_per_second": plain, "ratio": ratio,
            "spread": worst, "parity": abs(ratio - 1) <= worst, "graft_runs": graft_runs, "plain_runs": plain_runs}  # fmt: skip


def measure_feature_cache(backbone, meta, tr: Split, va: Split, ft: FineTuneParams) -> dict:
    """A default feature-extraction run (cache build included) against recomputing the
    frozen backbone for as many epochs."""
    model, cfg = load_pretrained(backbone, meta, scratch_assets(), 0)
    t0 = time.perf_counter()
    r = train(model, cfg, tr, va, replace(ft, mode="feature_extraction"))
    end_to_end = time.perf_counter() - t0
    cache = r.history[0]["feature_cache_seconds"]
    cached = float(np.mean([h["epoch_seconds"] for h in r.history[1:]]))
    model, cfg = load_pretrained(backbone, meta, scratch_assets(), 0)
    recompute = recompute_run_seconds(model, cfg, tr, va, ft, len(r.history))
    return {"epochs": len(r.history), "cached_epoch_seconds": cached,
            "recompute_epoch_seconds": float(np.mean(recompute[1:])), "epoch_speedup": float(np.mean(recompute[1:])) / cached,
            "cache_seconds": cache, "cache_images_per_second": (len(tr.y) + len(va.y)) / cache,
            "end_to_end_seconds": end_to_end, "recompute_end_to_end_seconds": float(sum(recompute)),
            "end_to_end_speedup": float(sum(recompute)) / end_to_end}  # fmt: skip


def measure_scratch(prepared: Path, backbone: LoadPretrainedParams, ft: FineTuneParams) -> dict:
    """From scratch as a practitioner would train it: every layer trainable, one learning
    rate for all of them, chosen by validation accuracy from SCRATCH_LRS; the test
    accuracy reported is that run's (the test split plays no part in the choice)."""
    scratch = replace(backbone, source=f"scratch:{backbone.architecture}")
    sweep = []
    for lr in SCRATCH_LRS:
        r = fit_and_test(prepared, scratch, replace(ft, mode="full", frozen_groups=0, head_epochs=0, lr_decay=1.0, lr=lr))
        sweep.append({"lr": lr, **r})
        print(f"   scratch lr {lr:g}: val accuracy {r['val_accuracy']:.4f}, test {r['test_accuracy']:.4f}", flush=True)
    best = max(sweep, key=lambda r: r["val_accuracy"])
    return {**best, "mode": "full", "lr_decay": 1.0, "sweep": sweep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also train on the full dataset (about 15 min)")
    parser.add_argument("--only", choices=SECTIONS, nargs="+", help="run only these sections")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file (atomically)")
    args = parser.parse_args()
    sections = set(args.only or [s for s in SECTIONS if s != "full" or args.full])

    ingest_p = load_section(IngestParams, "ingest")
    pre_p = load_section(PreprocessParams, "preprocess")
    backbone = load_section(LoadPretrainedParams, "load_pretrained")
    # The baselines are CPU loops and the file is results-cpu.json: graft runs on the CPU too.
    ft = replace(load_section(FineTuneParams, "fine_tune"), device="cpu")
    out: dict = {"machine": machine_info(),
                 "settings": {"image_size": pre_p.image_size, "batch_size": ft.batch_size, "eval_batch_size": ft.eval_batch_size}}  # fmt: skip
    print(f"benchmark on {out['machine']['cpu']}, {out['machine']['torch_threads']} torch threads", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare(work / "default", ingest_p, pre_p, backbone.architecture)
        tr, va, _ = splits(prepared)
        meta = prepared  # what load_pretrained builds the model for

        if "throughput" in sections:
            t = out["throughput"] = measure_throughput(backbone, meta, tr, va, ft)
            print(f"1. fine-tune throughput (medians of {t['rounds']} alternating rounds of {t['round_images']} images): "
                  f"graft {t['graft_images_per_second']:.0f} img/s, plain loop {t['plain_loop_images_per_second']:.0f} img/s, "
                  f"ratio {t['ratio']:.2f}, spread {t['spread']:.1%}{': parity' if t['parity'] else ''}", flush=True)  # fmt: skip

        if "feature_extraction" in sections:
            f = out["feature_extraction"] = measure_feature_cache(backbone, meta, tr, va, ft)
            print(f"2. feature extraction: epoch after the first {f['cached_epoch_seconds']:.2f}s cached vs "
                  f"{f['recompute_epoch_seconds']:.1f}s recomputing ({f['epoch_speedup']:.0f}x); whole {f['epochs']}-epoch run "
                  f"{f['end_to_end_seconds']:.1f}s with the cache build ({f['cache_seconds']:.1f}s, "
                  f"{f['cache_images_per_second']:.0f} img/s) vs {f['recompute_end_to_end_seconds']:.1f}s "
                  f"({f['end_to_end_speedup']:.1f}x)", flush=True)  # fmt: skip

        if "default" in sections:
            d = out["default"] = {**fit_and_test(prepared, backbone, ft), "frozen_groups": ft.frozen_groups}
            s = out["scratch"] = measure_scratch(prepared, backbone, ft)
            print(f"3. default params: test accuracy {d['test_accuracy']:.4f} in {d['fine_tune_seconds']:.0f}s "
                  f"({d['train_images']} train images); from scratch (full, lr {s['lr']:g}) {s['test_accuracy']:.4f} in "
                  f"{s['fine_tune_seconds']:.0f}s: transfer gains {d['test_accuracy'] - s['test_accuracy']:+.4f}", flush=True)  # fmt: skip

        if "full" in sections:
            full_prepared = prepare(work / "full", replace(ingest_p, max_train_per_class=None, max_test_per_class=None),
                                    pre_p, backbone.architecture)  # fmt: skip
            full = out["full"] = fit_and_test(full_prepared, backbone, replace(ft, epochs=max(ft.epochs, 6)))
            print(f"4. full data: test accuracy {full['test_accuracy']:.4f} in {full['fine_tune_seconds'] / 60:.1f} min "
                  f"({full['train_images']} train, {full['test_images']} test images, {full['epochs']} epochs)", flush=True)  # fmt: skip
    if args.json:
        # benchmarks/memory.py's and distill.py's figures share the file: keep them.
        kept = {k: v for k, v in (fsio.read_json(args.json) if args.json.is_file() else {}).items() if k in ("memory", "distill")}
        fsio.write_json(args.json, {**out, **kept})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
