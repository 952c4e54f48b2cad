"""Accuracy per minute: test accuracy against fine-tuning minutes, for the recipe levers.

Each variant is a set of ``fine_tune`` overrides on top of a preset (``image``: the
default quick run, 800 images per class; ``full``: all of Fashion-MNIST, the 15-minute
profile). For every variant it trains once with graft's own loop (the pure core of the
stage, on the CPU) and records:

- the learning curve against the clock: validation accuracy after each epoch at the
  fine-tuning seconds spent so far (validation included);
- the test accuracy of the model it ships, with and without test-time augmentation
  (flip averaging costs no training, so both come from the same weights).

The baseline is the preset's own recipe, trained in the same run: every other variant is
printed as its gain over it, in points of test accuracy and as a ratio of minutes.
The curves go to ``docs/img/accuracy-per-minute.png`` and the figures to the JSON
(``accuracy_per_minute``, under the preset's name).

Usage: python benchmarks/accuracy.py [--preset full] [--variants NAME ...] [--json results.json]
       [--work DIR]   (keeps the prepared data there between runs; Fashion-MNIST full: ~2 min to prepare)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graft.base import fsio
from graft.config.params import (
    DEFAULT_PARAMS,
    FineTuneParams,
    IngestParams,
    LoadPretrainedParams,
    PreprocessParams,
    parse_value,
    preset_overrides,
    read_params,
    section,
)
from graft.data.splits import load_split
from graft.models import modeling
from graft.overrides import apply_overrides
from graft.training.fine_tune import Split, train, with_tta

# The levers, each a set of fine_tune overrides on the preset's recipe. "preset" is the
# preset as written (the baseline); the others take one lever away from it or add one.
VARIANTS = {
    "image": {
        "preset": {},
        "ema": {"ema_decay": 0.995},
        "full-mode": {"mode": "full"},
        "progressive": {"min_image_size": 32, "epochs": 8},
        "mixup": {"mixup_alpha": 0.2},
        "cutmix": {"cutmix_alpha": 1.0},
        "no-smoothing": {"label_smoothing": 0.0},
        "lr-0.004": {"lr": 0.004},
        "frozen-2": {"frozen_groups": 2},  # the default before 3 seeds showed 1 better
        "batch-32": {"batch_size": 32},  # twice the optimizer steps per epoch
        "epochs-8": {"epochs": 8},
        "lr-decay-0.85": {"lr_decay": 0.85},  # the lower blocks learn faster
        "erase-0.5": {"erase_prob": 0.5},  # random erasing as Zhong et al. ran it on Fashion-MNIST
        "erase-0.25": {"erase_prob": 0.25},  # timm's usual reprob
        "randaug": {"randaug_ops": 2, "randaug_magnitude": 9},  # timm's rand-m9-n2-mstd0.5 (its ImageNet recipes)
        "randaug-light": {"randaug_ops": 1, "randaug_magnitude": 5},  # one op at half strength, for a short schedule
    },
    "full": {
        "preset": {},
        "ema": {"ema_decay": 0.999},
        "full-mode": {"mode": "full"},
        "frozen-1": {"frozen_groups": 1},  # the quick run's default since it beat 2 there
    },
}


def preset_params(preset: str) -> dict:
    """params.yaml with the preset applied, as `graft run --preset` writes it."""
    return apply_overrides(read_params(ROOT / DEFAULT_PARAMS), preset_overrides(preset, ROOT))


def prepared_data(params: dict, work: Path) -> Path:
    """The preset's data, ingested and preprocessed once per (ingest, preprocess) params."""
    from benchmarks.transfer import prepare

    key = hashlib.sha256(json.dumps([params["ingest"], params["preprocess"]], sort_keys=True).encode()).hexdigest()[:12]
    where = work / f"prepared-{key}"
    if not (where / "prepared" / "meta.json").is_file():
        if where.exists():
            import shutil

            shutil.rmtree(where)  # a preparation that was interrupted
        t0 = time.perf_counter()
        prepare(where, section(IngestParams, params, "ingest"), section(PreprocessParams, params, "preprocess"),
                params["load_pretrained"]["architecture"])  # fmt: skip
        print(f"prepared the data in {time.perf_counter() - t0:.0f}s -> {where}", flush=True)
    return where / "prepared"


def run_variant(prepared: Path, backbone: LoadPretrainedParams, ft: FineTuneParams) -> dict:
    from benchmarks.transfer import scratch_assets
    from graft.models.pretrained import load_pretrained

    model, cfg = load_pretrained(backbone, prepared, scratch_assets())
    tr, va, te = (Split(*load_split(prepared, s)) for s in ("train", "val", "test"))
    curve, clock = [], [time.perf_counter()]

    def on_epoch(record: dict) -> None:
        curve.append({"epoch": record["epoch"], "minutes": (time.perf_counter() - clock[0]) / 60,
                      "val_accuracy": record["val_accuracy"], "image_size": record.get("image_size")})  # fmt: skip

    result = train(model, cfg, tr, va, ft, on_epoch=on_epoch)
    minutes = (time.perf_counter() - clock[0]) / 60
    shipped = with_tta(cfg, ft.tta)
    test = {}
    for tta in ("none", "hflip"):
        probs = modeling.predict_proba(model, te.x, shipped, batch_size=ft.eval_batch_size, tta=tta)
        test[tta] = float((probs.argmax(1) == te.y).mean())
    return {"test_accuracy": test[ft.tta], "test_accuracy_no_tta": test["none"], "test_accuracy_hflip_tta": test["hflip"],
            "fine_tune_minutes": minutes, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "best_val_accuracy": result.best_val_accuracy, "curve": curve, "train_images": len(tr.y),
            "test_images": len(te.y)}  # fmt: skip


def same_recipe(a: dict, b: dict) -> bool:
    """Whether two recorded recipes train alike: a key that one lacks (a lever added to
    graft since) counts as its default, which is what that run trained with."""
    defaults = {f.name: f.default for f in fields(FineTuneParams)}
    return all(a.get(k, defaults.get(k)) == b.get(k, defaults.get(k)) for k in {*a, *b})


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (preset, r) in zip(axes[0], results.items()):
        for name, v in r["variants"].items():
            xs = [p["minutes"] for p in v["curve"]]
            ys = [p["val_accuracy"] for p in v["curve"]]
            line, = ax.plot(xs, ys, marker="o", label=f"{name}: test {v['test_accuracy']:.4f} in {v['fine_tune_minutes']:.1f} min")
            ax.plot([v["fine_tune_minutes"]], [v["test_accuracy"]], marker="*", markersize=12, color=line.get_color())
        ax.set_title(f"preset {preset} ({r['train_images']} training images)")
        ax.set_xlabel("fine-tuning minutes (2-core CPU), validation included")
        ax.set_ylabel("accuracy (lines: validation per epoch; stars: test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=sorted(VARIANTS), help="the recipe and data (presets/NAME.yaml)")
    parser.add_argument("--variants", nargs="+", help="run only these variants (default: all of the preset's)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra fine_tune override for every variant (a try-out: not written to the JSON)")
    parser.add_argument("--json", type=Path, help="add the figures to this JSON file under 'accuracy_per_minute'")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "accuracy-per-minute.png")
    parser.add_argument("--work", type=Path, default=Path("/tmp/graft-bench-accuracy"),
                        help="where the prepared data is kept between runs")
    args = parser.parse_args()

    from benchmarks.transfer import machine_info

    params = preset_params(args.preset)
    backbone = section(LoadPretrainedParams, params, "load_pretrained")
    base = replace(section(FineTuneParams, params, "fine_tune"), device="cpu")
    extra = {k: parse_value(v) for k, v in (a.split("=", 1) for a in args.extra)}
    names = args.variants or list(VARIANTS[args.preset])
    prepared = prepared_data(params, args.work)
    out = {"machine": machine_info(), "recipe": {**asdict(base), "image_size": params["preprocess"]["image_size"]},
           "variants": {}}
    for name in names:
        ft = replace(base, **{**VARIANTS[args.preset][name], **extra})
        print(f"--- {args.preset}/{name}: {VARIANTS[args.preset][name] or 'the preset as written'}", flush=True)
        r = out["variants"][name] = {**run_variant(prepared, backbone, ft), "overrides": VARIANTS[args.preset][name]}
        out["train_images"] = r["train_images"]
        print(f"{args.preset}/{name}: test accuracy {r['test_accuracy']:.4f} (no TTA {r['test_accuracy_no_tta']:.4f}, "
              f"flip TTA {r['test_accuracy_hflip_tta']:.4f}) in {r['fine_tune_minutes']:.1f} min, best epoch "
              f"{r['best_epoch']} of {r['epochs_run']}", flush=True)  # fmt: skip
    if "preset" in out["variants"]:
        b = out["variants"]["preset"]
        for r in out["variants"].values():  # the baseline's minutes of this run, kept with each lever's figures
            r["preset_minutes"] = b["fine_tune_minutes"]
        for name, r in out["variants"].items():
            print(f"  {name:>14}: {r['test_accuracy']:.4f} ({(r['test_accuracy'] - b['test_accuracy']) * 100:+.2f} points), "
                  f"{r['fine_tune_minutes']:.1f} min ({r['fine_tune_minutes'] / b['fine_tune_minutes']:.2f}x the preset's)")  # fmt: skip
    if extra:
        print(f"(with --set {extra}: a try-out, nothing written)")
        return
    if args.json:
        results = fsio.read_json(args.json) if args.json.is_file() else {}
        section_ = results.get("accuracy_per_minute", {})
        before = section_.get(args.preset, {})
        # A partial rerun keeps the other variants' figures, but only those measured on the
        # same recipe and CPU: a lever's row says what it changes against *this* baseline.
        if same_recipe(before.get("recipe", {}), out["recipe"]) and before.get("machine", {}).get("cpu") == out["machine"]["cpu"]:
            out["variants"] = {**before.get("variants", {}), **out["variants"]}
        elif before.get("variants"):
            print(f"dropped the earlier {args.preset} figures ({', '.join(before['variants'])}): another recipe or CPU")
        fsio.write_json(args.json, {**results, "accuracy_per_minute": {**section_, args.preset: out}})
        plot(fsio.read_json(args.json)["accuracy_per_minute"], args.plot)
        print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
