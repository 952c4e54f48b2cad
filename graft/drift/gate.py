"""Stage ``drift``: has the data moved since the champion was trained? A gate in the
pretrained backbone's embedding space, before training.

Great Expectations checks the schema (files decode, labels are known, no leaks). It cannot
see that this week's photos are darker, from another camera or of another product line.
The pretrained backbone turns every sample into an embedding; two samples of the same
distribution give two clouds of embeddings that a two-sample test cannot tell apart.

What the stage does, on the training split (``drift`` in params.yaml):

1. Embeds a seeded sample of at most ``drift.max_samples`` training samples with the
   pretrained backbone (``models/pretrained``; pooled features, the head is never used)
   and writes them to ``data/reference/``: this run's *reference*. ``register`` logs it
   with every model version, so the champion carries the reference of the data it was
   trained on.
2. Compares the new sample with the reference named by ``drift.reference`` (default the
   champion's): a kernel two-sample test (MMD, Gaussian kernel, permutation p-value)
   overall and per class, with Holm's correction over the whole family so that a verdict
   is wrong at most ``alpha`` of the time when nothing moved; and a domain classifier
   (logistic regression telling reference from new, cross-validated): its AUC is the
   readable signal (0.5: indistinguishable, 1.0: told apart every time).
3. Writes ``reports/drift/drift.json`` and ``drift.png`` (a 2-D projection of reference
   and new, the per-class shift). On drift, ``drift.on_drift: warn`` prints the classes
   that moved and goes on; ``fail`` stops the pipeline (exit code 2) before training.

Both sides are always embedded by the same network with the same input: the reference
records its backbone (a hash of its weights, without the head) and its input (image size,
tokenizer). When this run's backbone or input differs, the new data is embedded again
with the reference's own backbone, rebuilt from its source and checked against the hash;
if it cannot be rebuilt here, the test is refused with a message (``fail``: exit 2).

Too few samples on a side (under ``drift.min_samples``) skip a test with a warning; the
report says so, never a silent pass. ``graft drift PATH`` runs the same test on a folder
of incoming samples against the champion's reference.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graft import modalities
from graft.base import fsio
from graft.base.errors import GraftError, progress
from graft.config.params import FOLDS, DriftParams, IngestParams, LoadPretrainedParams, load_section, parse_reference
from graft.data import sources
from graft.data.samples import RawSamples
from graft.data.snapshot import source_path
from graft.models import modeling
from graft.registry import rules as registry
from graft.tracking import runs as tracking

EMBEDDINGS, LABELS, INFO, ASSETS = "embeddings.npy", "labels.npy", "reference.json", "assets"
ARTIFACT = "drift_reference"  # a registered version's run keeps its reference under this artifact path
REPORT_ARTIFACT = "drift"  # and the drift report of the run that trained it
REPORT, PLOT = "drift.json", "drift.png"
# Samples per backbone forward. Fixed: embeddings must not depend on anything but the
# backbone and the data. 64 was the CPU's fastest batch (fine_tune._features).
BATCH = 64
VERDICTS = ("drift", "no_drift", "skipped", "no_reference")




# --- the statistics (pure numpy; sklearn for the domain classifier) ---------------------------


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aa = np.einsum("ij,ij->i", a, a)[:, None]
    bb = np.einsum("ij,ij->i", b, b)[None, :]
    return np.maximum(aa + bb - 2.0 * (a @ b.T), 0.0)


# The kernel: a mean of Gaussians whose squared bandwidths are these fractions of the pooled
# sample's median squared distance. One bandwidth at the median (the textbook heuristic)
# sees mostly the distances *between* classes and misses a shift within them: on clustered
# synthetic embeddings it took a shift twice as large to reach p < 0.01.
SCALES = (0.05, 0.1, 0.25, 0.5, 1.0)


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> dict[str, float]:
    """Maximum mean discrepancy between samples ``x`` and ``y`` (kernel: :data:`SCALES`),
    and its permutation p-value ``(1 + #{permuted MMD >= observed}) / (1 + permutations)``,
    exact under the null whatever the kernel (it is fixed by the pooled sample).

    MMD^2 (the biased V-statistic, ``w' K w`` with ``w`` = 1/n on x and -1/m on y) is 0 for
    identical samples and grows with the shift; it is the per-class bar of the report."""
    rng = np.random.default_rng(seed)
    z = np.concatenate([x, y]).astype(np.float32)
    n, total = len(x), len(x) + len(y)
    d = _sq_dists(z, z)
    pick = rng.choice(total, size=min(total, 1000), replace=False)
    sub = d[np.ix_(pick, pick)][np.triu_indices(len(pick), k=1)]
    median = float(np.median(sub[sub > 0])) if np.any(sub > 0) else 1.0
    k = np.zeros_like(d)
    for s in SCALES:
        k += np.exp(-d / (median * s), dtype=np.float32)
    k /= len(SCALES)
    del d
    w = np.concatenate([np.full(n, 1.0 / n), np.full(total - n, -1.0 / (total - n))]).astype(np.float32)
    observed = float(w @ (k @ w))
    exceed = 0
    for start in range(0, permutations, 100):
        cols = min(100, permutations - start)
        perm = np.stack([w[rng.permutation(total)] for _ in range(cols)], axis=1)
        stats = np.einsum("ij,ij->j", perm, k @ perm)
        # a relative tolerance: float32 sums of equal samples are equal only up to rounding
        exceed += int((stats >= observed - 1e-6 * max(abs(observed), 1e-12)).sum())
    return {"mmd2": max(observed, 0.0), "p_value": (1 + exceed) / (1 + permutations), "median_sq_distance": median}


def domain_auc(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Cross-validated AUC of a logistic regression telling ``y`` from ``x`` (standardised,
    projected on at most 50 principal components): 0.5 when they cannot be told apart."""
    from sklearn.decomposition import PCA  # scikit-learn: ~1.4 s of import, paid where it computes
    from sklearn.linear_model import LogisticRegression  # scikit-learn: ~1.4 s of import, paid where it computes
    from sklearn.metrics import roc_auc_score  # scikit-learn: ~1.4 s of import, paid where it computes
    from sklearn.model_selection import StratifiedKFold, cross_val_predict  # scikit-learn: imported where used
    from sklearn.pipeline import make_pipeline  # scikit-learn: ~1.4 s of import, paid where it computes
    from sklearn.preprocessing import StandardScaler  # scikit-learn: ~1.4 s of import, paid where it computes

    z = np.concatenate([x, y]).astype(np.float64)
    side = np.r_[np.zeros(len(x), int), np.ones(len(y), int)]
    folds = min(FOLDS, len(x), len(y))
    components = max(1, min(50, z.shape[1], int(len(z) * (folds - 1) / folds) - 1))
    clf = make_pipeline(StandardScaler(), PCA(components, random_state=seed), LogisticRegression(C=1.0, max_iter=2000))
    proba = cross_val_predict(clf, z, side, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              method="predict_proba")[:, 1]  # fmt: skip
    return float(roc_auc_score(side, proba))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values: rejecting those under alpha is wrong at most
    alpha of the time over the whole family, whichever hypotheses are true."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return out


def compare(ref: np.ndarray, ref_labels: np.ndarray, new: np.ndarray, new_labels: np.ndarray | None,
            classes: list[str], p: DriftParams) -> dict[str, Any]:  # fmt: skip
    """The drift test of ``new`` against ``ref`` (embeddings; labels index ``classes``, None
    for unlabelled new samples): the report's verdict, overall and per-class parts."""
    out: dict[str, Any] = {"alpha": p.alpha, "permutations": p.permutations, "min_samples": p.min_samples,
                           "reference_samples": len(ref), "new_samples": len(new), "warnings": []}  # fmt: skip
    if min(len(ref), len(new)) < p.min_samples:
        out["warnings"].append(f"too few samples for a drift test ({len(ref)} reference, {len(new)} new; at least "
                               f"drift.min_samples = {p.min_samples} on each side): skipped")  # fmt: skip
        return {**out, "verdict": "skipped", "overall": None, "classes": {}, "moved": []}
    per_class: dict[str, dict[str, Any]] = {}
    if new_labels is not None:
        for i, c in enumerate(classes):
            r, n = int((ref_labels == i).sum()), int((new_labels == i).sum())
            if r or n:
                per_class[c] = {"reference": r, "new": n}
    testable = [c for c, e in per_class.items() if min(e["reference"], e["new"]) >= p.min_samples]
    # Holm multiplies the smallest p-value by the family's size: enough permutations that
    # a clear shift can still pass alpha with many classes (1 + 10 classes: 500 suffice).
    permutations = max(p.permutations, math.ceil(2 * (1 + len(testable)) / p.alpha))
    out["permutations"] = permutations
    overall = {**mmd_test(ref, new, permutations, p.seed), "domain_auc": domain_auc(ref, new, p.seed)}
    for i, c in enumerate(classes):
        entry = per_class.get(c)
        if entry is None:
            continue
        if c in testable:
            entry.update(mmd_test(ref[ref_labels == i], new[new_labels == i], permutations, p.seed + 1 + i))
        else:
            r, n = entry["reference"], entry["new"]
            entry["skipped"] = (f"fewer than {p.min_samples} samples on a side" if r and n
                                else ("not in the reference" if not r else "not in the new data"))  # fmt: skip
    # One warning per reason, naming its classes (not one per class, and each with its own reason).
    reasons: dict[str, list[str]] = {}
    for c, e in per_class.items():
        if "skipped" in e:
            reasons.setdefault(e["skipped"], []).append(c)
    for why, names in reasons.items():
        out["warnings"].append(f"per-class test skipped for {len(names)} class(es) ({', '.join(names[:5])}"
                               f"{', ...' if len(names) > 5 else ''}): {why}")  # fmt: skip
    family = {"overall": overall["p_value"], **{c: e["p_value"] for c, e in per_class.items() if "p_value" in e}}
    adjusted = holm(family)
    overall["p_adjusted"] = adjusted["overall"]
    for c, e in per_class.items():
        if "p_value" in e:
            e["p_adjusted"] = adjusted[c]
            e["moved"] = adjusted[c] < p.alpha
    moved = sorted((c for c, e in per_class.items() if e.get("moved")), key=lambda c: -per_class[c]["mmd2"])
    drift = any(v < p.alpha for v in adjusted.values())
    return {**out, "verdict": "drift" if drift else "no_drift", "overall": overall, "classes": per_class, "moved": moved,
            "p_adjusted_min": min(adjusted.values())}


# --- embedding -------------------------------------------------------------------------------


def backbone_sha256(model) -> str:
    """The backbone's identity: a hash of every weight and buffer but the classifier head's
    (a new head is random per run; the embedding never goes through it)."""

    import torch  # torch: ~2 s of import, paid where a model runs

    head = {id(t) for t in model.get_classifier().parameters()}
    skip = {name for name, t in model.named_parameters() if id(t) in head}
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name in skip:
            continue
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Embedder:
    """A backbone and the input it embeds with."""

    model: Any
    cfg: modeling.ModelConfig
    encoder: Any
    identity: dict[str, Any]  # what the reference records: modality, source, architecture, hashes, input, seed
    assets: Path | None

    def describe(self) -> str:
        return f"{self.identity['architecture']} ({self.identity['source']}, {self.cfg.kind.describe_input(self.cfg.input)})"


def identity_of(model, cfg: modeling.ModelConfig, seed: int) -> dict[str, Any]:
    return {"modality": cfg.modality, "source": cfg.source, "architecture": cfg.architecture,
            "weights_sha256": cfg.weights_sha256, "backbone_sha256": backbone_sha256(model), "input": cfg.input,
            "seed": seed}  # fmt: skip


def from_model_dir(model_dir: Path, seed: int) -> Embedder:
    """The backbone of a saved graft model (``models/pretrained``)."""
    model, cfg = modeling.load(model_dir)
    assets = Path(model_dir) / modeling.ASSETS
    encoder = cfg.kind.Encoder(cfg.input, assets)
    return Embedder(model, cfg, encoder, identity_of(model, cfg, seed), assets if assets.is_dir() else None)


def same_embedding(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["backbone_sha256"] == b["backbone_sha256"] and a["input"] == b["input"]


def rebuild(identity: dict[str, Any], assets: Path | None, why: str) -> Embedder:
    """The reference's own backbone, rebuilt from its recorded source and checked against
    its hash; a GraftError that says what to do when this machine cannot."""
    def refuse(reason: str) -> GraftError:
        return GraftError(f"drift: the reference was embedded with {identity['architecture']} from "
                          f"{identity['source']} and {why}; {reason}. Compare with a reference made with this "
                          "backbone (drift.reference: a run's data/reference folder), or set drift.reference: null "
                          "to run without a drift test.")  # fmt: skip

    kind = modalities.get(identity["modality"])
    params = LoadPretrainedParams(identity["architecture"], identity["source"], 0.0, int(identity.get("seed", 42)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_assets = Path(tmp) / ASSETS
        if assets is not None and assets.is_dir():
            shutil.copytree(assets, tmp_assets)
        tmp_assets.mkdir(exist_ok=True)
        try:
            built = kind.build(params, 1, dict(identity["input"]), tmp_assets)
        except Exception as e:
            raise refuse(f"it cannot be rebuilt here ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    sha = backbone_sha256(built.model)
    if sha != identity["backbone_sha256"]:
        raise refuse(f"rebuilt from its source it is another network (weights hash {sha[:12]}, the reference's "
                     f"{identity['backbone_sha256'][:12]})")  # fmt: skip
    cfg = modeling.ModelConfig(architecture=built.architecture, classes=["-"], drop_rate=0.0, source=built.source,
                               weights_sha256=built.weights_sha256, input=dict(identity["input"]),
                               modality=identity["modality"])  # fmt: skip
    return Embedder(built.model, cfg, kind.Encoder(cfg.input, assets), dict(identity), assets)


def embed(embedder: Embedder, batches, total: int, desc: str = "drift: embeddings") -> np.ndarray:
    """Pooled backbone features (N, F) float32 for ``batches`` of (positions, raw values)."""
    import torch  # torch: ~2 s of import, paid where a model runs

    device = modeling.resolve_device("auto")
    model = embedder.model.to(device).eval()
    out: np.ndarray | None = None
    with torch.inference_mode():
        for positions, values in progress(batches, total=math.ceil(total / BATCH), desc=desc, unit="batch"):
            x = modeling.to_input(embedder.encoder.batch(list(values)), embedder.cfg, device)
            f = model.forward_head(model.forward_features(x), pre_logits=True).float().cpu().numpy()
            if out is None:
                out = np.zeros((total, f.shape[1]), np.float32)
            out[np.asarray(positions)] = f
    return out if out is not None else np.zeros((0, 1), np.float32)


def raw_batches(samples):
    """(positions, values) batches of a :class:`RawSamples`."""
    column = samples.modality.INPUT_COLUMN
    for positions, frame in samples.batches(BATCH):
        yield positions, list(frame[column])


def choose(n: int, max_samples: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of at most ``max_samples`` of ``n`` positions, in order (so
    the same data gives the same sample, and class proportions are kept on average)."""
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


# --- references ----------------------------------------------------------------------------


@dataclass
class Reference:
    embeddings: np.ndarray
    labels: np.ndarray
    classes: list[str]
    identity: dict[str, Any]
    assets: Path | None
    origin: str  # for people: "graft-classifier v3", or a folder
    info: dict[str, Any]


def write_reference(out: Path, embeddings: np.ndarray, labels: np.ndarray, classes: list[str], embedder: Embedder,
                    extra: dict[str, Any]) -> None:  # fmt: skip
    np.save(out / EMBEDDINGS, embeddings.astype(np.float32))
    np.save(out / LABELS, labels.astype(np.int32))
    if embedder.assets is not None:  # a text backbone's tokenizer: the reference re-embeds with it
        shutil.copytree(embedder.assets, out / ASSETS, dirs_exist_ok=True)
    fsio.write_json(out / INFO, {"classes": classes, "samples": int(len(embeddings)), "backbone": embedder.identity,
                                 "dimensions": int(embeddings.shape[1]), **extra})  # fmt: skip


def read_reference(folder: Path, origin: str) -> Reference:
    info_path = Path(folder) / INFO
    if not info_path.is_file():
        raise GraftError(f"drift.reference: {folder}: not a drift reference (no {INFO}); a run's reference is "
                         "data/reference, written by the drift stage")  # fmt: skip
    info = fsio.read_json(info_path)
    emb = np.load(Path(folder) / EMBEDDINGS)
    labels = np.load(Path(folder) / LABELS)
    if len(emb) != len(labels) or len(emb) != info["samples"]:
        raise GraftError(f"{folder}: the reference is damaged ({len(emb)} embeddings, {len(labels)} labels, "
                         f"{info['samples']} recorded)")  # fmt: skip
    assets = Path(folder) / ASSETS
    return Reference(emb, labels, list(info["classes"]), info["backbone"], assets if assets.is_dir() else None,
                     origin, info)  # fmt: skip


def resolve(ref: str, model_name: str, dst: Path) -> tuple[Reference | None, str]:
    """The reference ``ref`` names, or (None, why) when there is none to compare with yet
    (no champion, a version registered before graft kept references). A named version or
    folder that does not exist is a GraftError."""
    where = parse_reference(ref, model_name, "drift.reference", "reference directory", "reference folder (data/reference of a run)")
    if isinstance(where, Path):
        return read_reference(where, str(where)), ""
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read
    from mlflow.exceptions import MlflowException  # MLflow: imported where used

    name, kind, value = where
    tracking.configure()
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, value) if kind == "alias" else client.get_model_version(name, value)
    except MlflowException as e:
        if kind == "alias" and value == registry.CHAMPION:
            return None, f"no champion of {name} yet: nothing to compare with (this run's reference is kept for the next)"
        what = f"no version with alias '{value}'" if kind == "alias" else f"no version {value}"
        raise GraftError(f"drift.reference: '{ref}': registered model '{name}' has {what} ({e.error_code}). "
                         "`graft status` lists the versions and aliases.") from None  # fmt: skip
    origin = f"{name} v{mv.version}"
    try:
        path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=ARTIFACT, dst_path=str(dst))
    except Exception:
        return None, (f"{origin} has no drift reference (registered before graft kept one): nothing to compare with; "
                      "the next registered version will carry one")  # fmt: skip
    return read_reference(Path(path), origin), ""


# --- the report --------------------------------------------------------------------------------


def summary(report: dict[str, Any]) -> str:
    """One paragraph for people: the verdict and what moved."""
    v = report["verdict"]
    against = report.get("reference", {}).get("origin", "the reference")
    if v == "no_reference":
        return f"drift: not tested: {report['reason']}"
    if v == "skipped":
        return f"drift: not tested: {'; '.join(report['warnings'])}"
    o = report["overall"]
    head = (f"drift: {'DRIFT' if v == 'drift' else 'no drift'} against {against} "
            f"(MMD p = {o['p_value']:.4f}, Holm-adjusted {o['p_adjusted']:.4f}, alpha {report['alpha']}; "
            f"domain classifier AUC {o['domain_auc']:.3f}; {report['reference_samples']} reference vs "
            f"{report['new_samples']} new samples)")  # fmt: skip
    if report["moved"]:
        head += "\n  classes that moved most: " + ", ".join(
            f"{c} (MMD^2 {report['classes'][c]['mmd2']:.4f}, p {report['classes'][c]['p_adjusted']:.4f})" for c in report["moved"][:5])
    elif v == "drift":
        head += "\n  the data moved as a whole; no single class stands out"
    for w in report["warnings"]:
        head += f"\n  warning: {w}"
    return head


def headline(report: dict[str, Any], long: bool = False) -> str:
    """The verdict in words, for the plot's title (``long``: with the reason, for its body)."""
    v = report["verdict"]
    short = {"drift": "DRIFT", "no_drift": "no drift", "no_reference": "not tested: no reference yet",
             "skipped": "not tested"}.get(v, v)  # fmt: skip
    why = report.get("reason") or "; ".join(report.get("warnings") or [])
    if not long or not why:
        return short
    return f"{short}\n\n" + "\n".join(textwrap.wrap(why, 60))


def plot(report: dict[str, Any], ref: np.ndarray, new: np.ndarray, path: Path) -> None:
    """Left: reference and new on the reference's first two principal components. Right:
    each class's shift (MMD^2), red where it moved."""
    import matplotlib  # matplotlib: ~0.6 s of import, paid where a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: ~0.6 s of import, paid where a plot is drawn

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if len(ref) >= 2 and len(new) and ref.shape[1] == new.shape[1]:
        mean = ref.mean(0)
        _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
        rng = np.random.default_rng(0)
        for data, label, color in ((ref, f"reference ({len(ref)})", "tab:blue"), (new, f"new ({len(new)})", "tab:orange")):
            pick = rng.choice(len(data), size=min(len(data), 1000), replace=False)
            xy = (data[pick] - mean) @ vt[:2].T
            ax1.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.4, label=label, color=color)
        ax1.legend(loc="best")
    ax1.set_title("embeddings, on the reference's 2 principal components")
    ax1.set_xlabel("PC 1")
    ax1.set_ylabel("PC 2")
    tested = [(c, e) for c, e in report.get("classes", {}).items() if "mmd2" in e]
    if tested:
        names = [c for c, _ in tested]
        ax2.barh(names, [e["mmd2"] for _, e in tested], color=["tab:red" if e.get("moved") else "tab:gray" for _, e in tested])
        ax2.invert_yaxis()
        ax2.set_xlabel("shift (MMD^2; red: moved, Holm-adjusted p < alpha)")
    else:
        ax2.text(0.5, 0.5, "no per-class test\n(unlabelled or too few samples)", ha="center", va="center")
        ax2.set_axis_off()
    ax2.set_title("per-class shift")
    o = report.get("overall") or {}
    fig.suptitle(headline(report) + (f": p = {o['p_value']:.4f}, domain AUC {o['domain_auc']:.3f}" if o else ""))
    if not (len(ref) >= 2 and len(new)):  # nothing to draw: say why in the picture, not with empty axes
        ax1.set_axis_off()
        ax1.text(0.5, 0.5, headline(report, long=True), ha="center", va="center", wrap=True)
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_report(report_dir: Path, report: dict[str, Any], ref: np.ndarray | None, new: np.ndarray | None) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    fsio.write_json(report_dir / REPORT, report)
    plot(report, ref if ref is not None else np.zeros((0, 2)), new if new is not None else np.zeros((0, 2)), report_dir / PLOT)


def check(reference: Reference, embedder: Embedder, batches_fn, total: int, labels: np.ndarray | None,
          new_classes: list[str] | None, p: DriftParams, mine: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """Embed the new samples as the reference was (reusing ``mine``, this run's embeddings,
    when the backbone and input are the same), then test. ``batches_fn()`` yields
    (positions, raw values); ``labels`` index ``new_classes`` (None: unlabelled)."""
    re_embedded = False
    if reference.identity.get("modality") != embedder.identity["modality"]:
        raise GraftError(f"drift: the reference ({reference.origin}) is of {reference.identity.get('modality')} samples, "
                         f"this data of {embedder.identity['modality']}")  # fmt: skip
    if mine is not None and same_embedding(reference.identity, embedder.identity):
        new = mine
    else:
        why = ("this run embeds with another backbone" if reference.identity["backbone_sha256"] != embedder.identity["backbone_sha256"]
               else "another input (size, tokenizer)")  # fmt: skip
        other = (embedder if same_embedding(reference.identity, embedder.identity)
                 else rebuild(reference.identity, reference.assets, why))  # fmt: skip
        new = embed(other, batches_fn(), total, desc="drift: embeddings (the reference's backbone)")
        re_embedded = other is not embedder
    mapped = None
    if labels is not None and new_classes is not None:  # into the reference's class indices (-1: a class it lacks)
        index = {c: i for i, c in enumerate(reference.classes)}
        extra = [c for c in new_classes if c not in index]
        classes = reference.classes + extra
        index.update({c: len(reference.classes) + i for i, c in enumerate(extra)})
        mapped = np.array([index[new_classes[int(i)]] for i in labels])
    else:
        classes = reference.classes
    report = compare(reference.embeddings, reference.labels, new, mapped, classes, p)
    report["re_embedded"] = re_embedded
    report["reference"] = {"origin": reference.origin, "samples": len(reference.embeddings),
                           "backbone": {k: reference.identity.get(k) for k in ("architecture", "source", "backbone_sha256", "input")},
                           **{k: reference.info[k] for k in ("data_version", "train_ids_sha256") if k in reference.info}}  # fmt: skip
    return report, new


def test_items(items: list[tuple[str | None, Any]], reference: Reference, p: DriftParams,
               pretrained: Path | None = None) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """Test incoming samples against ``reference``: ``items`` are (class or None, load),
    ``load()`` giving (raw value, error or ""). A seeded sample of at most
    ``p.max_samples`` is read; samples that cannot be decoded are left out (counted in
    the report). Embedded with ``pretrained`` (a project's models/pretrained) when it is
    the reference's backbone, else with the reference's backbone rebuilt."""
    chosen = choose(len(items), p.max_samples, p.seed)
    values, names, bad = [], [], 0
    for i in progress(chosen, desc="drift: reading", unit="sample", disable=len(chosen) < 500):
        value, error = items[int(i)][1]()
        if error:
            bad += 1
            continue
        values.append(value)
        names.append(items[int(i)][0])
    labelled = bool(names) and all(n is not None for n in names)
    new_classes: list[str] | None = None
    labels = None
    if labelled:
        new_classes = sorted({n for n in names if n is not None})
        labels = np.array([new_classes.index(n) for n in names if n is not None])
    embedder = None
    if pretrained is not None and (Path(pretrained) / modeling.CONFIG).is_file():
        candidate = from_model_dir(pretrained, int(reference.identity.get("seed", 42)))
        if same_embedding(reference.identity, candidate.identity):
            embedder = candidate
    if embedder is None:
        embedder = rebuild(reference.identity, reference.assets, "this project has no such backbone")

    def batches():
        for s in range(0, len(values), BATCH):
            yield np.arange(s, min(s + BATCH, len(values))), values[s : s + BATCH]

    report, new = check(reference, embedder, batches, len(values), labels, new_classes, p)
    report["unreadable"] = bad
    if bad:
        report["warnings"].append(f"{bad} of {len(chosen)} sampled inputs could not be decoded and were left out")
    report["labelled"] = labelled
    return report, new


def folder_items(kind, path: Path, classes: list[str], text_column: str | None = None) -> list[tuple[str | None, Any]]:
    """``graft drift PATH``'s samples: what ``graft predict`` reads, each with its class
    when PATH holds one sub-folder per class (names the reference knows, optionally
    under train/ and test/), else unlabelled (the overall test alone)."""
    inputs = kind.read_inputs(path, text_column)
    if not path.is_dir():
        return [(None, load) for _, load in inputs]
    parts = [Path(name).relative_to(path).parts for name, _ in inputs]
    parts = [q[1:] if len(q) > 2 and q[0].lower() in ("train", "test") else q for q in parts]
    named = [class_of_folder(q[0], classes) if len(q) >= 2 else None for q in parts]
    if all(len(q) >= 2 for q in parts) and any(n is not None for n in named):
        return [(n or q[0], load) for n, q, (_, load) in zip(named, parts, inputs, strict=True)]
    return [(None, load) for _, load in inputs]


def class_of_folder(folder: str, classes: list[str]) -> str | None:
    """The class a sub-folder holds: its name, or, for a class with a character no folder
    name can hold, that name with ``_`` for it (``T-shirt_top`` for ``T-shirt/top``); None
    for a name the reference does not know."""
    if folder in classes:
        return folder
    return next((c for c in classes if re.sub(r"[\\/:]", "_", c) == folder), None)


def folder_classes(items: list[tuple[str | None, Any]], path: Path, classes: list[str]) -> dict[str, str | None]:
    """Each class sub-folder of ``path`` and the class it was matched to (None: unknown),
    for the words ``graft drift`` says about them."""
    folders = {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()
    for split in ("train", "test"):
        sub = next((p for p in path.iterdir() if p.is_dir() and p.name.lower() == split), None) if path.is_dir() else None
        if sub is not None:
            folders.discard(sub.name)
            folders |= {p.name for p in sub.iterdir() if p.is_dir()}
    if not any(n is not None for n, _ in items):
        return {}
    return {f: class_of_folder(f, classes) for f in sorted(folders)}


def source_items(root: Path, params_path: Path) -> list[tuple[str | None, Any]]:
    """The samples of ``ingest.path`` as ingest would read them, with their classes (the
    data sensor's drift check: before ingest, without copying anything)."""
    ip = load_section(IngestParams, "ingest", params_path)
    if sources.is_url(ip.path):
        raise GraftError(f"ingest.path {ip.path} is a URL: the drift check of the data sensor reads a local source")
    kind = modalities.for_source(ip.source)
    source = kind.read_source(ip, source_path(ip, root))
    dropped = set(ip.drop_classes or ())

    def load(c):
        data = c.read()
        error = kind.inspect(data).get("error")
        return (kind.from_raw(data), "") if not error else (None, error)

    return [(c.class_name, lambda c=c: load(c)) for c in source.candidates if c.split == "train" and c.class_name not in dropped]


def log_to_parent_run(report_dir: Path, report: dict[str, Any]) -> None:
    """Under ``graft run``, the pipeline's MLflow run gets the report too: a gate that
    stops training leaves no model run, and its verdict must still be in MLflow. (Every
    trained model's run gets it from ``register``, with the reference.)"""
    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    if not parent:
        return
    import mlflow  # MLflow: ~1.8 s of import, paid where a run is logged or the registry read

    tracking.configure()
    client = mlflow.MlflowClient()
    for name in (REPORT, PLOT):
        client.log_artifact(parent, str(report_dir / name), REPORT_ARTIFACT)
    client.set_tag(parent, "graft.drift", report["verdict"])
    if report.get("overall"):
        client.log_metric(parent, "drift_p_adjusted", report["p_adjusted_min"])
        client.log_metric(parent, "drift_domain_auc", report["overall"]["domain_auc"])


def path_drift(path: Path, reference: str, model_name: str, p: DriftParams, pretrained: Path,
              text_column: str = "text", out: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """``graft drift``: samples on disk (as ``graft predict`` reads them; class sub-folders
    are tested class by class) against ``reference`` (an alias, name/version or a
    reference folder); the report, also written to ``out`` when given."""
    with tempfile.TemporaryDirectory() as dst:
        ref, why = resolve(reference, model_name, Path(dst))
        if ref is None:
            raise GraftError(f"nothing to test against: {why}")
        items = folder_items(modalities.get(ref.identity.get("modality")), path, ref.classes, text_column)
        report, new = test_items(items, ref, p, pretrained)
        report["class_folders"] = folder_classes(items, path, ref.classes)
        if out is not None:
            write_report(out, report, ref.embeddings, new)
    return report


# --- the drift stage's run ---------------------------------------------------------------------


@dataclass
class RunReference:
    """This run's reference, embedded: the backbone, the chosen training samples, their
    labels (indices into ``classes``) and embeddings."""

    embedder: Embedder
    subset: RawSamples
    labels: np.ndarray
    classes: list[str]
    embeddings: np.ndarray


def embed_training_sample(raw: Path, prepared: Path, pretrained: Path, p: DriftParams, seed: int) -> RunReference:
    """A seeded sample of the training split embedded by the pretrained backbone."""
    classes = list(fsio.read_json(prepared / "meta.json")["classes"])
    samples = RawSamples(raw, prepared, "train")
    subset = samples.subset(choose(len(samples), p.max_samples, p.seed))
    labels = np.array([classes.index(c) for c in subset.truth], dtype=np.int32)
    embedder = from_model_dir(pretrained, seed)
    return RunReference(embedder, subset, labels, classes, embed(embedder, raw_batches(subset), len(subset)))


def test_run(run: RunReference, p: DriftParams, model_name: str) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray]:
    """This run's sample against ``drift.reference``: the report, the reference's
    embeddings (None when there was nothing to compare) and the new ones in its space.
    A reference that cannot be compared is a warning, or the error under on_drift: fail."""
    base = {"on_drift": p.on_drift, "alpha": p.alpha, "backbone": run.embedder.describe()}
    new = run.embeddings  # in the reference's space once tested (another backbone: embedded again)
    with tempfile.TemporaryDirectory() as dst:
        reference, why = ((None, "drift.reference is null: no drift test") if p.reference is None
                          else resolve(p.reference, model_name, Path(dst)))  # fmt: skip
        if reference is None:
            return {**base, "verdict": "no_reference", "reason": why, "new_samples": len(new), "warnings": []}, None, new
        try:
            report, new = check(reference, run.embedder, lambda: raw_batches(run.subset), len(run.subset), run.labels,
                                run.classes, p, run.embeddings)  # fmt: skip
        except GraftError as e:
            if p.on_drift == "fail":
                raise
            # not comparable: the plot shows this run's sample alone
            return {**base, "verdict": "skipped", "reason": str(e), "new_samples": len(new), "warnings": [str(e)]}, None, new
        return {**base, **report}, reference.embeddings, new


def failure(report: dict[str, Any], p: DriftParams, report_dir: Path) -> GraftError | None:
    """The error that stops the pipeline when the data drifted under on_drift: fail."""
    if report["verdict"] != "drift" or p.on_drift != "fail":
        return None
    moved = report["moved"] or [c for c, _ in sorted(((c, e) for c, e in report["classes"].items() if "mmd2" in e),
                                                     key=lambda ce: -ce[1]["mmd2"])][:3]  # fmt: skip
    return GraftError(f"drift: the training data moved away from {report['reference']['origin']}'s "
                      f"(Holm-adjusted p = {report['p_adjusted_min']:.4f} < alpha {p.alpha}, domain AUC "
                      f"{report['overall']['domain_auc']:.3f}); classes that moved most: "
                      f"{', '.join(moved) or 'none singly (the whole data moved)'}. Training stopped (drift.on_drift: "
                      f"fail). Read {report_dir / PLOT}; if the change is intended, rerun with --set drift.on_drift=warn.")  # fmt: skip
