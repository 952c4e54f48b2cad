"""Stage ``preprocess``: split, then encode every sample with its modality's Encoder
(images: decoded, RGB, resized; texts: tokenized); store compact arrays.

Outputs (one directory, swapped in atomically): ``{train,val,test}_x.npy`` (images:
(N, S, S, 3) uint8; texts: (N, max_length) int32 token ids padded with -1),
``{train,val,test}_y.npy`` int64 labels, ``{split}_ids.npy`` sample ids, ``meta.json``
(classes, modality and the input config that ``model.json`` carries on), and ``assets/``
(what the Encoder needs: a tokenizer). Arrays are plain ``.npy``, written row by row
and read back a batch at a time (``graft/base/arrays.py``), so no stage holds a split in
memory. Image normalisation happens at load time, from the
backbone's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graft import modalities
from graft.base import fsio
from graft.base.archive import iter_snapshot
from graft.base.arrays import NpyReader, NpyWriter
from graft.base.errors import GraftError, progress
from graft.config.params import LoadPretrainedParams, PreprocessParams

if TYPE_CHECKING:  # imported where used: graft.config.params.SECTION_TYPES says why
    import pandas as pd

SPLITS = ("train", "val", "test")




def assign_splits(manifest: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
                  key: str = "sha256") -> pd.Series:  # fmt: skip
    """Stratified, seeded split. The source's own test split stays test; val (and test,
    when the source has none) is carved from train. Rows with the same ``key`` (identical
    content; for texts, equal up to case and whitespace) always land in the same split,
    whatever their labels, so duplicates cannot leak across; a group under several labels
    is drawn with its smallest label's groups."""
    import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

    rng = np.random.default_rng(seed)
    out = pd.Series("train", index=manifest.index, dtype=object)
    out[manifest["split"] == "test"] = "test"
    has_test = bool((manifest["split"] == "test").any())
    pool = manifest[manifest["split"] == "train"]
    home = pool.groupby(key)["label"].min()  # each group drawn once, under one label
    for label in sorted(pool["label"].unique()):
        rows = pool[pool[key].isin(home.index[home == label])]
        groups = sorted(rows[key].unique())
        order = [groups[i] for i in rng.permutation(len(groups))]
        n = len(order)
        n_test = 0 if has_test else round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n >= 3:  # keep at least one group in train, and one in each carved split
            n_test = 0 if has_test else min(max(n_test, 1), n - 2)
            n_val = min(max(n_val, 1), n - n_test - 1)
        test_groups, val_groups = set(order[:n_test]), set(order[n_test : n_test + n_val])
        out[rows.index[rows[key].isin(test_groups)]] = "test"
        out[rows.index[rows[key].isin(val_groups)]] = "val"
    return out


def preprocess(
    manifest: pd.DataFrame,
    classes: list[str],
    tar_path: Path,
    params: PreprocessParams,
    backbone: LoadPretrainedParams,
    out_dir: Path,
) -> dict:
    """Write the arrays into ``out_dir``; return the split metrics. The modality is the
    snapshot's (``tar_path``'s folder)."""
    modality = modalities.of_folder(tar_path.parent)
    if manifest["error"].notna().any() or (manifest["label"] < 0).any():
        raise GraftError(f"the manifest has undecodable {modality.SAMPLES} or unknown labels: run validate first")
    manifest = manifest.reset_index(drop=True)
    key = manifest[modality.leak_key].fillna(manifest["sha256"]) if modality.leak_key in manifest else manifest["sha256"]
    split = assign_splits(manifest.assign(_key=key), params.val_fraction, params.test_fraction, params.seed, "_key")
    spec = modality.input_spec(params, backbone, out_dir / "assets")
    encoder = modality.Encoder(spec, out_dir / "assets")
    writers, where = {}, {}
    for s in SPLITS:
        idx = np.flatnonzero((split == s).to_numpy())
        if len(idx) == 0:
            raise GraftError(f"preprocess: the {s} split is empty; add data or change preprocess fractions")
        found = sorted(manifest.loc[idx, "class_name"].unique())
        if len(found) < 2:
            # One class trains a model that is always "right": nothing to learn or score.
            raise GraftError(
                f"preprocess: the {s} split has {len(found)} class ({', '.join(found)}); training and scoring "
                f"need at least two. Add {modality.SAMPLES} of other classes to the source (ingest.path)."
            )
        writers[s] = NpyWriter(out_dir / f"{s}_x.npy", encoder.dtype, (len(idx), *encoder.shape))
        np.save(out_dir / f"{s}_y.npy", manifest.loc[idx, "label"].to_numpy(dtype=np.int64))
        np.save(out_dir / f"{s}_ids.npy", manifest.loc[idx, "id"].to_numpy(dtype=str))
        for pos, i in enumerate(idx):
            where[manifest.at[i, "member"]] = (s, pos)

    # One sample in memory at a time: each is encoded and written to its row on disk.
    samples = iter_snapshot(tar_path, where)
    for name, data in progress(samples, total=len(where), desc="preprocess", unit=modality.SAMPLES[:-1]):
        s, pos = where.pop(name)
        writers[s].write(pos, encoder.encode(data))
    if where:
        missing = ", ".join(sorted(where)[:5])
        raise GraftError(f"{tar_path}: {len(where)} manifest member(s) missing from the archive ({missing})")
    for w in writers.values():
        w.close()

    per_class = {
        s: {c: int(n) for c, n in zip(classes, np.bincount(manifest.loc[split == s, "label"], minlength=len(classes)), strict=True)}
        for s in SPLITS
    }
    metrics = {"samples": {s: int((split == s).sum()) for s in SPLITS}, "per_class": per_class}
    meta = {"classes": classes, "modality": modality.NAME, "input": spec}
    fsio.write_json(out_dir / "meta.json", meta)
    return metrics


def load_split(prepared: Path, split: str) -> tuple[NpyReader, np.ndarray]:
    """The encoded samples (images: uint8 (N, S, S, 3); texts: int32 (N, L)), read from
    disk a batch at a time (:class:`graft.base.arrays.NpyReader`), and the int64 labels of
    one split (in memory: 8 bytes a sample)."""
    x_path = prepared / f"{split}_x.npy"
    if not x_path.is_file():
        raise GraftError(f"{x_path}: not found. Run the preprocess stage first (`dvc repro preprocess`).")
    return NpyReader(x_path), np.load(prepared / f"{split}_y.npy")
