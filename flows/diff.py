"""``graft diff A B``: what differs between two registered versions, or a version and the
working copy: params, data (classes, per-class counts, files added and removed), the
pretrained backbone, and the metrics with per-class deltas, plus a paired McNemar test
when both models can score this workspace's test samples.

Each side is read from what was recorded when it was trained (the lineage that
``graft reproduce`` uses: ``params.yaml`` and ``dvc.lock`` as run artifacts); the data's
manifests come from this project's DVC cache by their hashes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.reproduce import _cache_dir, cache_object, read_lineage
from graft.base import fsio
from graft.base.errors import GraftError
from graft.config import paths
from graft.models import modeling
from graft.promotion import gate
from graft.tracking.runs import flatten

WORKSPACE = "workspace"


@dataclass
class Side:
    label: str
    params: dict[str, Any]
    lock: dict[str, Any]
    metrics: dict[str, Any]
    pretrained: dict[str, str]
    version: str | None = None  # a registered version (None: the working copy)
    weights: str | None = None  # sha256 of the fine-tuned weights (None: not recorded)


def version_side(client, name: str, version: str) -> Side:
    lineage = read_lineage(client, name, version)
    run = client.get_run(lineage.training_run_id)
    return Side(f"v{version}", yaml.safe_load(lineage.params_yaml) or {}, lineage.lock, lineage.metrics,
                {"source": run.data.tags.get("pretrained_source", "?"), "weights sha256": lineage.pretrained_sha256},
                version, lineage.weights_sha256)  # fmt: skip


def workspace_side(root: Path) -> Side:
    def need(path: Path) -> Path:
        if not path.is_file():
            raise GraftError(f"{path}: not found; the working copy has no complete run to compare (`graft run` first)")
        return path

    cfg = json.loads(need(root / paths.PRETRAINED / modeling.CONFIG).read_text())
    return Side(WORKSPACE, yaml.safe_load(need(root / paths.PARAMS).read_text()) or {},
                yaml.safe_load(need(root / paths.DVC_LOCK).read_text()) or {},
                json.loads(need(root / paths.METRICS).read_text()),
                {"source": str(cfg.get("source", "?")), "weights sha256": str(cfg.get("weights_sha256") or "none")},
                weights=fsio.sha256_file(weights) if (weights := root / paths.FINE_TUNED / modeling.WEIGHTS).is_file() else None)  # fmt: skip


def params_diff(a: Side, b: Side) -> list[dict[str, Any]]:
    fa, fb = flatten(a.params), flatten(b.params)
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _raw_md5(lock: dict[str, Any]) -> str | None:
    for o in lock.get("stages", {}).get("ingest", {}).get("outs", []):
        if o["path"] == str(paths.RAW):
            return str(o.get("md5"))
    return None


def manifest(root: Path, lock: dict[str, Any]):
    """The ingest manifest of a side, read from the DVC cache by its hash (None if absent)."""
    import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

    md5 = _raw_md5(lock)
    if not md5:
        return None
    cache = _cache_dir(root)
    try:
        entries = json.loads(cache_object(cache, md5).read_text())
        csv = next(e["md5"] for e in entries if e["relpath"] == "manifest.csv")
        return pd.read_csv(io.BytesIO(cache_object(cache, csv).read_bytes()), dtype=str, keep_default_na=False)
    except (OSError, StopIteration, ValueError):
        return None


def data_diff(root: Path, a: Side, b: Side) -> dict[str, Any]:
    out: dict[str, Any] = {"snapshot": {"a": _raw_md5(a.lock), "b": _raw_md5(b.lock)}}
    out["identical"] = out["snapshot"]["a"] == out["snapshot"]["b"]
    ma, mb = manifest(root, a.lock), manifest(root, b.lock)
    if ma is None or mb is None:
        out["note"] = "a data manifest is not in this project's DVC cache: `graft pull --version N` fetches it"
        return out
    ca, cb = (set(m["class_name"]) for m in (ma, mb))
    out["classes"] = {"only_a": sorted(ca - cb), "only_b": sorted(cb - ca)}
    counts = []
    for cls in sorted(ca | cb):
        for split in ("train", "test"):
            na = int(((ma["class_name"] == cls) & (ma["split"] == split)).sum())
            nb = int(((mb["class_name"] == cls) & (mb["split"] == split)).sum())
            if na != nb:
                counts.append({"class": cls, "split": split, "a": na, "b": nb})
    out["counts"] = counts
    key = lambda m: set(zip(m["path"], m["sha256"], strict=True))  # noqa: E731
    ka, kb = key(ma), key(mb)
    out["files"] = {"removed": len(ka - kb), "added": len(kb - ka), "examples_added": sorted(p for p, _ in kb - ka)[:5],
                    "examples_removed": sorted(p for p, _ in ka - kb)[:5]}  # fmt: skip
    return out


def metrics_diff(a: Side, b: Side) -> dict[str, Any]:
    rows = {}
    for key in ("accuracy", "macro_f1", "ece"):
        va, vb = a.metrics.get(key), b.metrics.get(key)
        rows[key] = {"a": va, "b": vb, "delta": (vb - va) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None}
    fa, fb = a.metrics.get("per_class_f1", {}), b.metrics.get("per_class_f1", {})
    per_class = {c: {"a": fa.get(c), "b": fb.get(c), "delta": (fb[c] - fa[c]) if c in fa and c in fb else None}
                 for c in sorted(set(fa) | set(fb))}  # fmt: skip
    return {"headline": rows, "per_class_f1": per_class}


def paired_test(root: Path, name: str, a: Side, b: Side) -> dict[str, Any] | None:
    """Both sides score this workspace's test samples; McNemar on the pairs."""
    raw, prepared = root / paths.RAW, root / paths.PREPARED
    if not (prepared / "test_ids.npy").is_file():
        return {"note": "not computed: no test data in this workspace (`graft run` or `graft pull`)"}
    try:
        samples = gate.load_test_samples(raw, prepared)
        # the gate's own scoring: b as the candidate, a in the champion's seat
        pair = gate.score_pair(_model(root, name, b), _model(root, name, a), samples, a.label)
    except Exception as e:  # a model that cannot load or predict here
        return {"note": f"not computed: the two versions cannot score the same samples ({type(e).__name__}: {e})"}
    if pair.champion_correct is None:
        return {"note": f"not computed: {pair.incompatible}"}
    cb, ca = pair.candidate_correct, pair.champion_correct
    return {"n": len(samples), "accuracy_a": float(ca.mean()), "accuracy_b": float(cb.mean()), **gate.mcnemar(cb, ca)}


class _WorkspaceModel:
    """The working copy's fine-tuned model behind the same serving code as a registered
    version (its preprocessing included), with a pyfunc's ``predict``."""

    def __init__(self, model_dir: Path):
        from graft.models import serving  # the library module: imported where used

        self.wrapper = serving.load_folder(model_dir)

    def predict(self, frame):
        return self.wrapper.predict(None, frame)


def _model(root: Path, name: str, side: Side):
    from graft.models import serving  # mlflow.pyfunc: 1.5 to 2 s of import, only when a model is loaded

    if side.version is None:
        return _WorkspaceModel(root / paths.FINE_TUNED)
    return serving.load_registered(f"models:/{name}/{side.version}")


def diff(root: Path, client, name: str, a: Side, b: Side, score: bool = True) -> dict[str, Any]:
    return {"model": name, "a": a.label, "b": b.label, "params": params_diff(a, b), "data": data_diff(root, a, b),
            "pretrained": {"a": a.pretrained, "b": b.pretrained, "identical": a.pretrained == b.pretrained},
            "weights": {"a": a.weights, "b": b.weights,
                        "identical": a.weights == b.weights if a.weights and b.weights else None},
            "metrics": metrics_diff(a, b), "paired": paired_test(root, name, a, b) if score else None}  # fmt: skip


def render(d: dict[str, Any]) -> list[str]:
    """The diff as terminal lines."""
    a, b = d["a"], d["b"]
    lines = [f"{d['model']}: {a} -> {b}", "", "params:"]
    lines += [f"  {p['key']}: {p['a']!r} -> {p['b']!r}" for p in d["params"]] or ["  identical"]
    data = d["data"]
    lines += ["", "data:", f"  snapshot {str(data['snapshot']['a'])[:12]} -> {str(data['snapshot']['b'])[:12]}"
              + ("  (identical)" if data["identical"] else "")]  # fmt: skip
    if "note" in data:
        lines.append(f"  {data['note']}")
    elif not data["identical"]:
        cls = data["classes"]
        if cls["only_a"] or cls["only_b"]:
            lines.append(f"  classes only in {a}: {cls['only_a'] or '-'}; only in {b}: {cls['only_b'] or '-'}")
        for c in data["counts"][:20]:
            lines.append(f"  {c['class']} ({c['split']}): {c['a']} -> {c['b']} images")
        f = data["files"]
        lines.append(f"  files: {f['added']} added, {f['removed']} removed" + (f", e.g. +{f['examples_added'][0]}" if f["examples_added"] else ""))
    p = d["pretrained"]
    lines += ["", "pretrained:"]
    for key in ("source", "weights sha256"):
        va, vb = p["a"].get(key), p["b"].get(key)
        lines.append(f"  {key}: {va}" + ("" if va == vb else f" -> {vb}"))
    w = d["weights"]
    same = {True: "byte-identical", False: "different", None: "not recorded on both"}[w["identical"]]
    lines += ["", f"fine-tuned weights: {same} (sha256 {str(w['a'])[:12]}" + ("" if w["a"] == w["b"] else f" -> {str(w['b'])[:12]}") + ")"]
    lines += ["", f"metrics ({a} -> {b}):"]
    for key, r in d["metrics"]["headline"].items():
        lines.append(f"  {key:<10} {_f(r['a'])} -> {_f(r['b'])}  {_delta(r['delta'])}")
    for cls, r in d["metrics"]["per_class_f1"].items():
        lines.append(f"  F1 {cls:<18} {_f(r['a'])} -> {_f(r['b'])}  {_delta(r['delta'])}")
    paired = d.get("paired")
    if paired:
        lines.append("")
        if "note" in paired:
            lines.append(f"paired test: {paired['note']}")
        else:
            lines.append(f"paired test on this workspace's {paired['n']} test samples: accuracy {paired['accuracy_a']:.4f} -> "
                         f"{paired['accuracy_b']:.4f}; right only with {b}: {paired['b']}, only with {a}: {paired['c']}, "
                         f"McNemar p = {paired['p_value']:.3g}")  # fmt: skip
    return lines


def _f(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "?"


def _delta(v: float | None) -> str:
    return "" if v is None else f"({v:+.4f})"
