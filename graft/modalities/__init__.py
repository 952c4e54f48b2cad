"""The modality seam: everything graft does that depends on what a sample *is*.

The seven stages are modality-free: they split, train, score, gate and register
samples. Whatever depends on the kind of sample lives in one module per modality,
behind the interface below, and a stage asks :func:`get` for the module of its data:

- ``ingest`` picks the module from ``ingest.source`` (:data:`SOURCES`) and records the
  modality in the snapshot (``data/raw/meta.json``);
- every later stage reads it from its input (the snapshot, the prepared data's
  ``meta.json``, a model's ``model.json``), so no stage and no parameter repeats it.

Adding a modality (speech, say) means writing ``graft/modalities/speech.py`` with the
names below and listing its sources in :data:`SOURCES` (which names the modules); no
stage changes.

The interface (module-level names of a modality module):

=====================  ==============================================================
``NAME``               "image", "text", ...
``SOURCES``            the ``ingest.source`` values it reads
``INPUT_COLUMN``       the column of raw samples the registered model predicts from
``MANIFEST_COLUMNS``   {column: pandas dtype} it adds to the ingest manifest
``check_source``       cheap check that ``ingest.path`` holds such a source
``source_files``       the files of a local source that count (the data sensor)
``url_wanted``         which files of a URL source ingest reads
``read_source``        the source's samples (:class:`Candidate`) and classes
``inspect``            one sample's raw bytes -> its manifest columns and error
``expectations``       the modality's data-gate checks (Great Expectations)
``leak_key``           manifest column whose equal values are one sample (splits, leaks)
``input_spec``         params -> how raw bytes become model inputs (``model.json``)
``Encoder``            raw bytes -> one model input row; serving and training share it
``build``              params -> a model with a new head (a :class:`Built`)
``create``             a saved model's config and folder -> the same network, untrained
``to_input``           a batch of encoded rows -> the model's input tensor
``augment``            a training batch -> an augmented batch (identity where none)
``MIXABLE``, ``mix``   whether it takes mixup / CutMix / erasing; a training batch -> mixed, with partners and weight
``TEST_VIEWS``         the test-time augmentations it offers (``fine_tune.tta``)
``test_views``         a model input -> the inputs whose predictions are averaged
``rescale``            a model input -> the same at another size (progressive resizing)
``present_mistakes``   the most confident test mistakes -> a file for people
``read_inputs``        ``graft predict``'s path -> names, raw values, errors
``from_raw``           a raw sample's bytes (the snapshot) -> the model's input value
=====================  ==============================================================
"""

from __future__ import annotations

import errno
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from graft.base import fsio
from graft.base.errors import GraftError

if TYPE_CHECKING:
    from graft.modalities.interface import Modality

# ingest.source -> modality. One table, so the params check, ingest and the docs agree.
SOURCES = {
    "fashion-mnist": "image",
    "imagefolder": "image",
    "texttable": "text",
    "textfolder": "text",
}

MODALITIES = tuple(dict.fromkeys(SOURCES.values()))  # each is the module graft/modalities/<name>.py
DEFAULT = "image"  # snapshots and models made before the seam carry no modality: images


@dataclass(frozen=True)
class Candidate:
    """One sample a source offers, read lazily (``read``) so ingest can subsample first."""

    split: str  # train or test: the source's own split
    class_name: str | None  # None: the source gave no label (validate names the row)
    path: str  # where it came from, for people: a file, or file:line for a table
    suffix: str  # the member's extension in the snapshot's tar
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Source:
    candidates: list[Candidate]
    classes: tuple[str, ...]  # classes the source itself defines, in order
    ignored: list[str]  # files skipped because they are not this modality's


@dataclass(frozen=True)
class Built:
    """A model with its new head, and where its weights came from."""

    model: Any  # torch.nn.Module (Any: importing this module does not import torch)
    source: str
    architecture: str
    weights_sha256: str | None  # of the pretrained weights; None for scratch
    input: dict[str, Any]  # the modality's input config, completed with the backbone's (mean/std, ...)


def of_source(source: str) -> str:
    if source not in SOURCES:
        raise GraftError(f"params.yaml: ingest.source '{source}' is not known; use one of {', '.join(SOURCES)}")
    return SOURCES[source]


def get(name: str | None) -> Modality:
    """The module of modality ``name`` (None: a snapshot or model from before the seam)."""
    name = name or DEFAULT
    if name not in MODALITIES:
        raise GraftError(f"unknown modality '{name}' (known: {', '.join(MODALITIES)}); was this made by a newer graft?")
    return cast("Modality", importlib.import_module(f"{__name__}.{name}"))  # interface.py checks each module


def for_source(source: str) -> Modality:
    return get(of_source(source))


def of_folder(data_dir: Path) -> Modality:
    """The modality module of a snapshot or prepared folder (its ``meta.json``)."""
    meta = data_dir / "meta.json"
    return get(fsio.read_json(meta).get("modality") if meta.is_file() else None)


# --- what several modalities share ------------------------------------------------------


def worst_mistakes(y: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` wrong predictions made with the highest confidence (ties: the
    earlier sample first); each modality presents them its own way."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    return wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:k]

SPLIT_DIRS = ("train", "test")


def _visible_dirs(path) -> list:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_folder(path) -> None:
    if not path.exists():
        raise GraftError(
            f"ingest.path: {path}: no such directory. Set ingest.path to a folder with one sub-folder per "
            "class, e.g. `graft run --set ingest.path=/path/to/data` (or edit params.yaml)."
        )
    if not path.is_dir():
        raise GraftError(f"ingest.path: {path}: not a directory. ingest.path must be a folder with one sub-folder per class.")
    bad = bad_links(path)
    if bad:
        shown = "\n".join(f"  {rel}: {why}" for rel, why in bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise GraftError(f"ingest.path: {path}: {len(bad)} symbolic link(s) that cannot be read as files:\n{shown}\n"
                         "Remove them or point them at real files, then run again.")  # fmt: skip


def bad_links(root) -> list[tuple[str, str]]:
    """Symbolic links under ``root`` that no tool can read through, as (path relative to
    ``root``, why): a link to itself or round a cycle, a link whose target is gone, and a
    folder link to one of its own parents (a walk that follows it never ends). DVC stops
    on the first two with a traceback when it hashes the source, and skips the third
    silently; the data gate names them all instead. Only links are looked at: cheap."""
    root = os.fspath(root)
    found: list[tuple[str, str]] = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                continue
            rel = os.path.relpath(full, root)
            try:
                os.stat(full)
            except OSError as e:
                found.append((rel, "a symbolic link loop" if e.errno == errno.ELOOP else "a broken symbolic link (its target is gone)"))
                continue
            target = os.path.realpath(full)
            if os.path.isdir(full) and (os.path.realpath(folder) + os.sep).startswith(target.rstrip(os.sep) + os.sep):
                found.append((rel, f"a folder link to its own parent ({os.path.relpath(target, root) if target.startswith(root) else target}): a loop"))
    return sorted(found)


def list_class_folders(root, extensions: tuple[str, ...], what: str):
    """The files of a folder-per-class source, optionally under ``train/`` and ``test/``:
    (split, class, path) for each file with one of ``extensions``, the classes (every
    class folder, empty ones included), and the other files, which it ignores."""
    check_folder(root)
    top = _visible_dirs(root)
    if not top:
        raise GraftError(
            f"{root}: no class folders found. Expected one sub-folder per class "
            "(e.g. cats/, dogs/), optionally under train/ and test/."
        )
    split_dirs = [d for d in top if d.name.lower() in SPLIT_DIRS]
    if split_dirs:
        others = [d.name for d in top if d not in split_dirs]
        if others:
            raise GraftError(
                f"{root}: has split folders ({', '.join(d.name for d in split_dirs)}) and also "
                f"other folders ({', '.join(others)}). Put every class folder under train/ and test/."
            )
        layout = [(d.name.lower(), c) for d in split_dirs for c in _visible_dirs(d)]
    else:
        layout = [("train", c) for c in top]

    found, ignored = [], []
    for split, class_dir in layout:
        for f in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in f.relative_to(root).parts):
                continue
            if f.suffix.lower() not in extensions:
                ignored.append(f.relative_to(root).as_posix())
                continue
            found.append((split, class_dir.name, f))
    if not found:
        raise GraftError(
            f"{root}: no {what} found (looked for {', '.join(extensions)} "
            f"in {len(layout)} class folder(s)). Put the {what} in one sub-folder per class."
        )
    return found, tuple(sorted({c.name for _, c in layout})), ignored


def folder_candidates(root, extensions: tuple[str, ...], what: str) -> Source:
    found, classes, ignored = list_class_folders(root, extensions, what)
    candidates = [Candidate(split, cls, f.relative_to(root).as_posix(), f.suffix.lower(), f.read_bytes)
                  for split, cls, f in found]  # fmt: skip
    return Source(candidates, classes, ignored)


def url_class_files(entries: dict, extensions: tuple[str, ...]) -> dict:
    """The visible files with one of ``extensions`` inside class sub-folders of a URL listing."""

    return {rel: info for rel, info in entries.items()
            if not any(part.startswith(".") for part in rel.split("/"))
            and PurePosixPath(rel).suffix.lower() in extensions and "/" in rel}  # fmt: skip
