"""Benchmark graft's transfer learning on this machine, in one process.

Prints, each against a baseline measured in the same run:

1. fine-tune throughput (images/s) of graft's training loop against a plain, hand-written
   timm/torch loop on the same model, data, image size and batch size (both channels_last);
2. feature-extraction epochs after the first (cached features) against recomputing the
   frozen backbone every epoch;
3. test accuracy and fine-tune time of the default params (the quick subset), and of the
   same configuration from ``scratch:`` (the gain from transfer);
4. test accuracy and fine-tune time on the full dataset (``--full``; about 15 minutes here).

Usage: python benchmarks/transfer.py [--full] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from stages import fsio, modeling
from stages.backbone import LoadPretrainedParams, preprocessing_config
from stages.config import load_section
from stages.fine_tune import FineTuneParams, Split, train
from stages.ingest import IngestParams, ingest
from stages.load_pretrained import load_pretrained
from stages.preprocess import PreprocessParams, load_split, preprocess


SECTIONS = ("throughput", "feature_extraction", "default", "full")
ROUNDS = 3


def prepare(work: Path, ingest_params: IngestParams, pre_params: PreprocessParams, arch: str) -> Path:
    raw, prepared = work / "raw", work / "prepared"
    raw.mkdir(parents=True)
    prepared.mkdir()
    manifest, classes, _ = ingest(ingest_params, raw)
    preprocess(manifest, list(classes), raw / "images.tar", pre_params, preprocessing_config(arch).interpolation, prepared)
    return prepared


def splits(prepared: Path) -> tuple[Split, Split, Split]:
    return tuple(Split(*load_split(prepared, s, mmap=False)) for s in ("train", "val", "test"))  # type: ignore[return-value]


def fit_and_test(prepared: Path, backbone: LoadPretrainedParams, ft: FineTuneParams) -> dict:
    meta = fsio.read_json(prepared / "meta.json")
    model, cfg = load_pretrained(backbone, meta, backbone.seed)
    tr, va, te = splits(prepared)
    t0 = time.perf_counter()
    result = train(model, cfg, tr, va, ft)
    seconds = time.perf_counter() - t0
    probs = modeling.predict_proba(model, te.x, cfg, batch_size=ft.eval_batch_size)
    return {"test_accuracy": float((probs.argmax(1) == te.y).mean()), "fine_tune_seconds": seconds,
            "epochs": len(result.history), "train_images": len(tr.y), "test_images": len(te.y)}  # fmt: skip


def plain_loop_images_per_second(model, cfg, data: Split, batch_size: int, epochs: int, lr: float) -> float:
    """The baseline: the shortest correct timm/torch loop (channels_last, AdamW, no extras)."""
    import torch
    import torch.nn.functional as F

    model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(data.y))
        for s in range(0, len(order), batch_size):
            idx = np.sort(order[s : s + batch_size])
            x = torch.from_numpy(data.x[idx]).permute(0, 3, 1, 2).float().div(255)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), torch.from_numpy(data.y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return epochs * len(data.y) / (time.perf_counter() - t0)


def recompute_epoch_seconds(model, cfg, data: Split, batch_size: int) -> float:
    """Feature extraction without a cache: each epoch runs the frozen backbone again."""
    import torch
    import torch.nn.functional as F

    model.eval()
    head = model.get_classifier()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for s in range(0, len(data.y), batch_size):
        x = modeling.to_input(data.x[s : s + batch_size], cfg, "cpu")
        with torch.no_grad():
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        loss = F.cross_entropy(head(feats), torch.from_numpy(data.y[s : s + batch_size]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also train on the full dataset (about 15 min)")
    parser.add_argument("--only", choices=SECTIONS, nargs="+", help="run only these sections")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file too")
    args = parser.parse_args()
    sections = set(args.only or [s for s in SECTIONS if s != "full" or args.full])

    import torch

    ingest_p = load_section(IngestParams, "ingest")
    pre_p = load_section(PreprocessParams, "preprocess")
    backbone = load_section(LoadPretrainedParams, "load_pretrained")
    ft = load_section(FineTuneParams, "fine_tune")
    out: dict = {"torch_threads": torch.get_num_threads(), "image_size": pre_p.image_size, "batch_size": ft.batch_size}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare(work / "default", ingest_p, pre_p, backbone.architecture)
        tr, va, _ = splits(prepared)
        meta = fsio.read_json(prepared / "meta.json")

        # 1. Throughput: same model, data, size, batch; full fine-tuning. The two loops
        # alternate for ROUNDS rounds and the medians are compared, so a burst of load on
        # a shared machine does not decide the ratio.
        if "throughput" in sections:
            sub = Split(tr.x[:1024], tr.y[:1024])
            p = replace(ft, mode="full", epochs=1, hflip=False, crop_padding=0, patience=99, warmup_epochs=0.0)
            plain_runs, graft_runs = [], []
            for _ in range(ROUNDS):
                model, cfg = load_pretrained(backbone, meta, 0)
                plain_runs.append(plain_loop_images_per_second(model, cfg, sub, ft.batch_size, 1, ft.lr))
                model, cfg = load_pretrained(backbone, meta, 0)
                r = train(model, cfg, sub, Split(va.x[:64], va.y[:64]), p)
                graft_runs.append(r.history[0]["images_per_second"])
            plain, graft_ips = float(np.median(plain_runs)), float(np.median(graft_runs))
            out["throughput"] = {"graft_images_per_second": graft_ips, "plain_loop_images_per_second": plain,
                                 "ratio": graft_ips / plain, "rounds": ROUNDS}  # fmt: skip
            print(f"1. fine-tune throughput (median of {ROUNDS} alternating rounds): graft {graft_ips:.0f} img/s, "
                  f"plain loop {plain:.0f} img/s, ratio {graft_ips / plain:.2f}", flush=True)  # fmt: skip

        # 2. Feature extraction: cached epochs against recomputing the backbone.
        if "feature_extraction" in sections:
            model, cfg = load_pretrained(backbone, meta, 0)
            r = train(model, cfg, tr, va, replace(ft, mode="feature_extraction", epochs=4, patience=99))
            cached = float(np.mean([h["epoch_seconds"] for h in r.history[1:]]))
            model, cfg = load_pretrained(backbone, meta, 0)
            recompute = recompute_epoch_seconds(model, cfg, tr, ft.batch_size)
            out["feature_extraction"] = {"cached_epoch_seconds": cached, "recompute_epoch_seconds": recompute,
                                         "speedup": recompute / cached, "cache_seconds": r.history[0].get("feature_cache_seconds")}  # fmt: skip
            print(f"2. feature extraction: epoch after the first {cached:.2f}s cached vs {recompute:.1f}s recomputing, "
                  f"{recompute / cached:.0f}x faster", flush=True)  # fmt: skip

        # 3. Default params, pretrained and from scratch.
        if "default" in sections:
            default = fit_and_test(prepared, backbone, ft)
            scratch = fit_and_test(prepared, replace(backbone, source=f"scratch:{backbone.architecture}"), ft)
            out["default"], out["scratch"] = default, scratch
            print(f"3. default params: test accuracy {default['test_accuracy']:.4f} in {default['fine_tune_seconds']:.0f}s "
                  f"({default['train_images']} train images); from scratch {scratch['test_accuracy']:.4f} in "
                  f"{scratch['fine_tune_seconds']:.0f}s: transfer gains {default['test_accuracy'] - scratch['test_accuracy']:+.4f}", flush=True)  # fmt: skip

        # 4. Full data.
        if "full" in sections:
            full_prepared = prepare(work / "full", replace(ingest_p, max_train_per_class=None, max_test_per_class=None),
                                    pre_p, backbone.architecture)  # fmt: skip
            full = fit_and_test(full_prepared, backbone, replace(ft, epochs=max(ft.epochs, 6)))
            out["full"] = full
            print(f"4. full data: test accuracy {full['test_accuracy']:.4f} in {full['fine_tune_seconds'] / 60:.1f} min "
                  f"({full['train_images']} train, {full['test_images']} test images, {full['epochs']} epochs)", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
