"""Benchmark the text modality on this machine, in one process, every figure against a
baseline measured in the same run.

Fresh vs rotten on the Rotten Tomatoes corpus (``make text-data``), one seeded,
stratified subsample and one split (graft's own ingest and preprocess), shared by all:

1. a TF-IDF (word 1-2-grams) + logistic-regression baseline (scikit-learn), its C chosen
   on the validation split, fitted on the raw training texts;
2. all-MiniLM-L6-v2 fine-tuned with the text preset's settings (``presets/text.yaml``);
3. feature extraction alone: the frozen encoder's cached mean-pooled embeddings, a
   trained head;
4. the same architecture from ``scratch:`` (random weights), full training;
5. the default text run, end to end: ``graft run --preset text`` in a fresh copy of the
   project (its own DVC, MLflow and Prefect), wall-clock seconds;
6. the registered pyfunc's predict throughput (texts/s) on the test texts, from raw strings.

Every field of the JSON it writes is measured or read from the machine; the README's
text table is made from it by ``benchmarks/report.py``.

Usage: python benchmarks/text.py [--per-class N] [--json benchmarks/results-text-cpu.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.transfer import machine_info  # noqa: E402
from graft.base import fsio
from graft.config.params import (  # noqa: E402
    FineTuneParams,
    IngestParams,
    LoadPretrainedParams,  # noqa: E402
    PreprocessParams,
    preset_overrides,
    read_params,
    section,
)
from graft.data.snapshot import ingest, read_manifest  # noqa: E402
from graft.data.splits import load_split, preprocess  # noqa: E402
from graft.models import modeling  # noqa: E402
from graft.models.pretrained import load_pretrained  # noqa: E402
from graft.overrides import apply_overrides  # noqa: E402
from graft.training.fine_tune import Split, train  # noqa: E402

C_GRID = (0.25, 1.0, 4.0, 16.0)


def text_params(per_class: int | None) -> dict:
    params = apply_overrides(read_params(ROOT / "params.yaml"), preset_overrides("text", ROOT))
    params["ingest"]["path"] = str(ROOT / params["ingest"]["path"])
    params["ingest"]["max_train_per_class"] = per_class
    return params


def raw_texts(raw: Path, prepared: Path, split: str) -> list[str]:
    manifest, _ = read_manifest(raw)
    members = manifest.set_index("id").loc[[str(i) for i in np.load(prepared / f"{split}_ids.npy")], "member"].tolist()
    with tarfile.open(raw / "samples.tar") as tar:
        by_member = {m.name: tar.extractfile(m).read().decode() for m in tar}  # type: ignore[union-attr]
    return [by_member[m] for m in members]


def tfidf_baseline(raw: Path, prepared: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts = {s: raw_texts(raw, prepared, s) for s in ("train", "val", "test")}
    y = {s: np.load(prepared / f"{s}_y.npy") for s in texts}
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform(texts["train"])
    sweep = []
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, y["train"])
        sweep.append({"C": c, "val_accuracy": float(clf.score(vec.transform(texts["val"]), y["val"])), "clf": clf})
    best = max(sweep, key=lambda r: r["val_accuracy"])
    test = float(best["clf"].score(vec.transform(texts["test"]), y["test"]))
    return {"test_accuracy": test, "val_accuracy": best["val_accuracy"], "C": best["C"], "fit_seconds": time.perf_counter() - t0,
            "features": int(xtr.shape[1]), "sweep": [{k: v for k, v in r.items() if k != "clf"} for r in sweep]}  # fmt: skip


def fit_and_test(prepared: Path, backbone: LoadPretrainedParams, ft: FineTuneParams) -> dict:
    model, cfg = load_pretrained(backbone, prepared, Path(tempfile.mkdtemp(prefix="graft-bench-")) / "assets")
    tr, va, te = (Split(*load_split(prepared, s)) for s in ("train", "val", "test"))
    t0 = time.perf_counter()
    result = train(model, cfg, tr, va, ft)
    seconds = time.perf_counter() - t0
    probs = modeling.predict_proba(model, te.x, cfg, batch_size=ft.eval_batch_size)
    return {"test_accuracy": float((probs.argmax(1) == te.y).mean()), "val_accuracy": result.best_val_accuracy,
            "fine_tune_seconds": seconds, "epochs": len(result.history), "mode": ft.mode, "lr": ft.lr,
            "train_texts": len(tr.y), "test_texts": len(te.y),
            "samples_per_second": float(np.mean([h["samples_per_second"] for h in result.history]))}  # fmt: skip


def default_run() -> dict:
    """``graft run --preset text`` in a fresh copy of the project; wall-clock seconds."""
    from tests.conftest import copy_project, project_env

    with tempfile.TemporaryDirectory(prefix="graft-bench-run-") as tmp:
        project = copy_project(Path(tmp) / "project")
        corpus = project / "data" / "external"
        corpus.mkdir(parents=True, exist_ok=True)
        for f in (ROOT / "data" / "external").iterdir():  # the corpus: git-ignored, so not in the copy
            shutil.copy(f, corpus / f.name)
        graft = str(Path(sys.executable).parent / "graft")
        t0 = time.perf_counter()
        res = subprocess.run([graft, "run", "--preset", "text"], cwd=project, env=project_env(project),
                             capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"the default text run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        metrics = fsio.read_json(project / "reports" / "evaluate" / "metrics.json")
        throughput = predict_throughput(project)
    return {"seconds": seconds, "test_accuracy": metrics["accuracy"], "test_texts": metrics["n"], **throughput}


def predict_throughput(project: Path) -> dict:
    """The registered champion as a user loads it (pyfunc), on raw test strings."""
    import mlflow

    from graft.promotion.gate import load_test_samples
    from tests.conftest import project_env

    mlflow.set_tracking_uri(project_env(project)["MLFLOW_TRACKING_URI"])
    pyfunc = mlflow.pyfunc.load_model("models:/graft-classifier@champion")
    test = load_test_samples(project / "data" / "raw", project / "data" / "prepared")
    samples, truth = test.frame(), test.truth
    pyfunc.predict(samples.iloc[:8])  # warm-up
    t0 = time.perf_counter()
    rounds = 3
    for _ in range(rounds):
        pred = pyfunc.predict(samples)
    seconds = (time.perf_counter() - t0) / rounds
    return {"predict_texts_per_second": len(samples) / seconds,
            "predict_accuracy": float((pred["class"].to_numpy() == np.asarray(truth)).mean())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=2500,
                        help="reviews per class in the subsample (default 2500: 5,000 of the corpus's 12,808)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file (atomically)")
    args = parser.parse_args()
    os.chdir(ROOT)
    params = text_params(args.per_class)
    ingest_p = section(IngestParams, params, "ingest")
    pre_p = section(PreprocessParams, params, "preprocess")
    backbone = section(LoadPretrainedParams, params, "load_pretrained")
    ft = replace(section(FineTuneParams, params, "fine_tune"), device="cpu")
    out: dict = {"machine": machine_info(), "settings": {"per_class": args.per_class, "max_length": pre_p.max_length,
                 "batch_size": ft.batch_size, "epochs": ft.epochs, "backbone": backbone.source}}  # fmt: skip
    print(f"text benchmark on {out['machine']['cpu']}, {out['machine']['torch_threads']} torch threads", flush=True)

    with tempfile.TemporaryDirectory(prefix="graft-bench-text-") as tmp:
        raw, prepared = Path(tmp) / "raw", Path(tmp) / "prepared"
        raw.mkdir(), prepared.mkdir()
        manifest, classes, _ = ingest(ingest_p, raw)
        preprocess(manifest, list(classes), raw / "samples.tar", pre_p, backbone, prepared)

        b = out["tfidf"] = tfidf_baseline(raw, prepared)
        print(f"1. TF-IDF + logistic regression (C {b['C']:g}): test accuracy {b['test_accuracy']:.4f} "
              f"({b['fit_seconds']:.1f}s)", flush=True)
        f = out["fine_tuned"] = fit_and_test(prepared, backbone, ft)
        print(f"2. MiniLM fine-tuned ({ft.mode}): test accuracy {f['test_accuracy']:.4f} in {f['fine_tune_seconds']:.0f}s "
              f"({f['train_texts']} train texts, {f['samples_per_second']:.0f} texts/s): "
              f"{(f['test_accuracy'] - b['test_accuracy']) * 100:+.1f} points over TF-IDF", flush=True)  # fmt: skip
        fe = out["feature_extraction"] = fit_and_test(prepared, backbone, replace(ft, mode="feature_extraction", lr=2e-3,
                                                                                   epochs=20, patience=5))  # fmt: skip
        print(f"3. feature extraction alone: test accuracy {fe['test_accuracy']:.4f} in {fe['fine_tune_seconds']:.0f}s", flush=True)
        scratch_backbone = replace(backbone, source="scratch:minilm-l6")
        s = out["scratch"] = fit_and_test(prepared, scratch_backbone, replace(ft, lr=3e-4, lr_decay=1.0))
        print(f"4. scratch:minilm-l6 (full, lr 3e-4): test accuracy {s['test_accuracy']:.4f} in {s['fine_tune_seconds']:.0f}s",
              flush=True)  # fmt: skip
    d = out["default_run"] = default_run()
    print(f"5. default text run (graft run --preset text): {d['seconds']:.0f}s end to end, test accuracy "
          f"{d['test_accuracy']:.4f} on {d['test_texts']} texts", flush=True)  # fmt: skip
    print(f"6. registered pyfunc: {d['predict_texts_per_second']:.0f} texts/s from raw strings", flush=True)
    if args.json:
        fsio.write_json(args.json, out)


if __name__ == "__main__":
    main()
