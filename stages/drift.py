"""Stage ``drift``: has the data moved since the champion was trained? A gate in the pretrained backbone's embedding space, before training.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.drift``): it reads its
params section, calls :mod:`graft.drift.gate` and writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from graft.base import fsio
from graft.base.errors import GraftError
from graft.config.params import DEFAULT_PARAMS, DriftParams, LoadPretrainedParams, RegisterParams, load_section
from graft.data.samples import RawSamples
from graft.drift.gate import (
    PLOT,
    REPORT,
    check,
    choose,
    embed,
    from_model_dir,
    log_to_parent_run,
    raw_batches,
    resolve,
    summary,
    write_reference,
    write_report,
)
from graft.stage import stage_main, thread_sizer


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.drift",
        description="The drift gate: embed a sample of the training data with the pretrained backbone (this run's "
        "reference, for the models it trains), and test it against the champion's reference (params.yaml, "
        "section 'drift'). on_drift: fail stops the pipeline here, before training, with exit code 2.",
    )
    parser.add_argument("--raw", required=True, type=Path, help="ingest output directory (the raw samples)")
    parser.add_argument("--prepared", required=True, type=Path, help="preprocess output directory (train split, classes)")
    parser.add_argument("--pretrained", required=True, type=Path, help="load_pretrained output directory (the backbone)")
    parser.add_argument("--out", required=True, type=Path, help="this run's reference directory (replaced atomically)")
    parser.add_argument("--report", required=True, type=Path, help=f"report directory ({REPORT}, {PLOT})")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    thread_sizer("drift")  # before any torch work: the CPUs other processes leave free

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    p = load_section(DriftParams, "drift", args.params)
    seed = load_section(LoadPretrainedParams, "load_pretrained", args.params).seed
    model_name = load_section(RegisterParams, "register", args.params).model_name
    t0 = time.perf_counter()
    classes = list(fsio.read_json(args.prepared / "meta.json")["classes"])
    samples = RawSamples(args.raw, args.prepared, "train")
    chosen = choose(len(samples), p.max_samples, p.seed)
    subset = samples.subset(chosen)
    labels = np.array([classes.index(c) for c in subset.truth], dtype=np.int32)
    embedder = from_model_dir(args.pretrained, seed)
    mine = embed(embedder, raw_batches(subset), len(subset))
    with fsio.atomic_dir(args.out) as tmp:
        write_reference(tmp, mine, labels, classes, embedder,
                        {"split": "train", "train_ids_sha256": fsio.sha256_file(args.prepared / "train_ids.npy")})  # fmt: skip

    base = {"on_drift": p.on_drift, "alpha": p.alpha, "backbone": embedder.describe()}
    new = mine  # in the reference's space once tested (another backbone: embedded again)
    with tempfile.TemporaryDirectory() as dst:
        reference, why = (None, "drift.reference is null: no drift test") if p.reference is None else resolve(p.reference, model_name, Path(dst))
        if reference is None:
            report = {**base, "verdict": "no_reference", "reason": why, "new_samples": len(mine), "warnings": []}
            ref_emb = None
        else:
            try:
                report, new = check(reference, embedder, lambda: raw_batches(subset), len(subset), labels, classes, p, mine)
                ref_emb = reference.embeddings
            except GraftError as e:
                if p.on_drift == "fail":
                    raise
                report = {**base, "verdict": "skipped", "reason": str(e), "new_samples": len(mine), "warnings": [str(e)]}
                ref_emb = None  # not comparable: the plot shows this run's sample alone
            report = {**base, **report}
    report["seconds"] = time.perf_counter() - t0
    write_report(args.report, report, ref_emb, new)
    log_to_parent_run(args.report, report)
    print(summary(report) + f"\n  ({report['seconds']:.1f}s; reference for this run: {len(mine)} samples -> {args.out}; "
          f"report -> {args.report / REPORT})")
    if report["verdict"] == "drift" and p.on_drift == "fail":
        moved = report["moved"] or [c for c, _ in sorted(((c, e) for c, e in report["classes"].items() if "mmd2" in e),
                                                         key=lambda ce: -ce[1]["mmd2"])][:3]  # fmt: skip
        raise GraftError(f"drift: the training data moved away from {report['reference']['origin']}'s "
                         f"(Holm-adjusted p = {report['p_adjusted_min']:.4f} < alpha {p.alpha}, domain AUC "
                         f"{report['overall']['domain_auc']:.3f}); classes that moved most: "
                         f"{', '.join(moved) or 'none singly (the whole data moved)'}. Training stopped (drift.on_drift: fail). "
                         f"Read {args.report / PLOT}; if the change is intended, rerun with --set drift.on_drift=warn.")  # fmt: skip

if __name__ == "__main__":
    main()
