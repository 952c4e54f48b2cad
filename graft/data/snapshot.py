"""Stage ``ingest``: a source of labelled samples (images, texts) to a canonical raw snapshot.

Outputs (one directory, swapped in atomically):

- ``samples.tar``: every sample's raw bytes (an encoded image, a UTF-8 text), one member per sample, in manifest order,
  with fixed metadata, so the same input gives a byte-identical file;
- ``manifest.csv``: one row per sample (see :data:`MANIFEST_COLUMNS`);
- ``classes.json``: the ordered class list (a label is an index into it);
- ``meta.json``: the modality, which every later stage reads from its input.

Samples that cannot be decoded are kept and recorded with their error, so that
``validate`` fails on them by name instead of the data silently shrinking.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graft import modalities
from graft.base import fsio
from graft.base.archive import SNAPSHOT, add_member
from graft.base.errors import GraftError, progress
from graft.config.params import IngestParams
from graft.data import sources
from graft.modalities import Candidate

if TYPE_CHECKING:  # imported where used: graft.config.params.SECTION_TYPES says why
    import pandas as pd

# Every modality's manifest has these; each adds its own (graft.modalities: MANIFEST_COLUMNS).
MANIFEST_COLUMNS = [
    "id",  # stable sample id, also the member name stem in samples.tar
    "label",  # index into classes.json; -1 when the class is not in the declared set
    "class_name",  # empty when the source gave no label (validate names the row)
    "split",  # the source's own split: train or test
    "sha256",  # of the raw bytes: identical content has identical hashes
    "path",  # where the sample came from, relative to the source path (file:line for a table)
    "member",  # member name in samples.tar
    "error",  # empty when the sample decodes, else why not
]




# --- reading sources -------------------------------------------------------------------


def source_path(params: IngestParams, root: Path | None = None) -> Path:
    """``ingest.path`` as a path; a relative one is relative to the project ``root``."""
    path = Path(params.path).expanduser()
    return path if path.is_absolute() or root is None else root / path


def url_files(params: IngestParams) -> dict[str, dict]:
    """For a URL source: the files ingest reads there ({path relative to the URL: its size
    and version}). Raises, naming the URL, when they are not there."""
    return modalities.for_source(params.source).url_wanted(params, sources.listing(params.path))


@contextlib.contextmanager
def readable_source(params: IngestParams, root: Path | None = None) -> Iterator[Path]:
    """The source as a local path: ``ingest.path`` itself, or, for a URL, a temporary
    copy of the files ingest reads there (removed afterwards)."""
    if sources.is_url(params.path):
        wanted = sorted(url_files(params))
        with sources.local_copy(params.path, wanted) as local:
            is_file = len(wanted) == 1 and params.path.rstrip("/").endswith("/" + wanted[0])
            yield local / wanted[0] if is_file else local  # a URL naming one file: that file
    else:
        yield source_path(params, root)


def check_source(params: IngestParams, root: Path | None = None) -> None:
    """Fail early, naming ``ingest.path`` and what to set, when the source is not there.
    Cheap (no file is read): the orchestrator calls it before handing over to DVC."""
    if sources.is_url(params.path):
        url_files(params)
        return
    modalities.for_source(params.source).check_source(params, source_path(params, root))


def source_files(params: IngestParams, root: Path | None = None) -> tuple[Path, list[Path], tuple[str, ...]]:
    """What ingest would read, without reading it: the source path, the files that count
    and the classes. One listing for ingest and the data sensor, so a file ingest ignores
    (a README.txt) never triggers a retraining."""
    path = source_path(params, root)
    check_source(params, root)
    files, classes = modalities.for_source(params.source).source_files(params, path)
    return path, files, classes


# --- the pure core ---------------------------------------------------------------------


def subsample(
    candidates: list[Candidate], max_per_class: dict[str, int | None], seed: int
) -> list[Candidate]:
    """Keep at most ``max_per_class[split]`` samples of each (split, class), chosen
    uniformly with ``seed``; the kept samples stay in their original order."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault((c.split, c.class_name or ""), []).append(i)  # "": no label
    keep: list[int] = []
    for key in sorted(groups):
        idx = groups[key]
        limit = max_per_class.get(key[0])
        if limit is not None and len(idx) > limit:
            idx = sorted(rng.choice(idx, size=limit, replace=False).tolist())
        keep.extend(idx)
    return [candidates[i] for i in sorted(keep)]




def write_snapshot(chosen: list[Candidate], classes: tuple[str, ...], out_dir: Path, modality) -> pd.DataFrame:
    """Write ``samples.tar`` and return the manifest (one row per chosen sample)."""
    import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

    index = {name: i for i, name in enumerate(classes)}
    rows = []
    width = max(6, len(str(len(chosen))))
    with tarfile.open(out_dir / SNAPSHOT, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n, c in enumerate(progress(chosen, desc="ingest", unit=modality.SAMPLES[:-1])):
            data = c.read()
            sample_id = f"{n:0{width}d}"
            member = f"{sample_id}{c.suffix}"
            add_member(tar, member, data)
            info = modality.inspect(data)
            rows.append({"id": sample_id, "label": index.get(c.class_name, -1), "class_name": c.class_name,
                         "split": c.split, "sha256": fsio.sha256_bytes(data), "path": c.path, "member": member,
                         **info})  # fmt: skip
    manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *modality.MANIFEST_COLUMNS])
    return manifest.astype({k: v for k, v in modality.MANIFEST_COLUMNS.items() if v == "Int64"})


def ingest(params: IngestParams, out_dir: Path) -> tuple[pd.DataFrame, tuple[str, ...], list[str]]:
    """Read the source, subsample, write the snapshot into ``out_dir``."""
    modality = modalities.for_source(params.source)
    with readable_source(params) as root:
        source = modality.read_source(params, root)
        dropped = set(params.drop_classes)
        classes = params.classes if params.classes is not None else tuple(c for c in source.classes if c not in dropped)
        candidates = [c for c in source.candidates if c.class_name not in dropped]
        chosen = subsample(
            candidates,
            {"train": params.max_train_per_class, "test": params.max_test_per_class},
            params.seed,
        )
        manifest = write_snapshot(chosen, classes, out_dir, modality)
    manifest.to_csv(out_dir / "manifest.csv", index=False, lineterminator="\n")
    fsio.write_json(out_dir / "classes.json", list(classes))
    fsio.write_json(out_dir / "meta.json", {"modality": modality.NAME, "source": params.source})
    return manifest, classes, source.ignored



def read_manifest(raw_dir: Path, columns: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Load ``manifest.csv`` and ``classes.json`` from an ingest output directory; only
    ``columns``, if given (a reader that needs three of them holds a fraction of the
    memory: a full row's strings, its hashes and paths, take about a kilobyte)."""
    import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

    manifest_path, classes_path = raw_dir / "manifest.csv", raw_dir / "classes.json"
    for p in (manifest_path, classes_path):
        if not p.is_file():
            raise GraftError(f"{p}: not found. Run the ingest stage first (`dvc repro ingest`).")
    extra = modalities.of_folder(raw_dir).MANIFEST_COLUMNS
    numbers = [c for c, t in extra.items() if t == "Int64"]
    manifest = pd.read_csv(
        manifest_path,
        usecols=columns,
        dtype={c: str for c in MANIFEST_COLUMNS + list(extra) if c not in ("label", *numbers)},
        keep_default_na=False,
        na_values={c: [""] for c in ("label", *numbers)},
    ).astype({c: "Int64" for c in numbers if columns is None or c in columns})
    for c in ("error", "class_name", *[c for c in extra if c not in numbers]):
        if c in manifest:
            manifest[c] = manifest[c].replace("", None)
    with open(classes_path, encoding="utf-8") as f:
        classes = json.load(f)
    return manifest, classes


# --- the thin main ---------------------------------------------------------------------
