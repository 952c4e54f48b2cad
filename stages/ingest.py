"""Stage ``ingest``: a source of labelled images to a canonical raw snapshot.

Outputs (one directory, swapped in atomically):

- ``images.tar``: every sample's encoded bytes, one member per sample, in manifest order,
  with fixed metadata, so the same input gives a byte-identical file;
- ``manifest.csv``: one row per sample (see :data:`MANIFEST_COLUMNS`);
- ``classes.json``: the ordered class list (a label is an index into it).

Files that cannot be decoded are kept and recorded with their error, so that
``validate`` fails on them by name instead of the data silently shrinking.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from stages import fsio, images, sources
from stages.common import GraftError, progress, stage_main
from stages.config import DEFAULT_PARAMS, load_section

MANIFEST_COLUMNS = [
    "id",  # stable sample id, also the member name stem in images.tar
    "label",  # index into classes.json; -1 when the class is not in the declared set
    "class_name",
    "split",  # the source's own split: train or test
    "sha256",  # of the encoded bytes: identical content has identical hashes
    "width",
    "height",
    "mode",  # PIL mode of the decoded file (L, RGB, RGBA, P, ...)
    "path",  # where the sample came from, relative to the source path
    "member",  # member name in images.tar
    "error",  # empty when the image decodes, else why not
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_DIRS = ("train", "test")


@dataclass(frozen=True)
class IngestParams:
    source: Literal["fashion-mnist", "imagefolder"]
    path: str
    seed: int
    classes: tuple[str, ...] | None = None  # null: the source's own class list
    max_train_per_class: int | None = None  # null: every training sample
    max_test_per_class: int | None = None

    def validate(self) -> None:
        for key in ("max_train_per_class", "max_test_per_class"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise GraftError(f"params.yaml: ingest.{key} must be >= 1 or null, got {value}")


@dataclass(frozen=True)
class Candidate:
    split: str
    class_name: str
    path: str  # relative to the source, for people to find the file
    suffix: str
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Source:
    candidates: list[Candidate]
    classes: tuple[str, ...]  # classes the source itself defines, in order
    ignored: list[str]  # files skipped because their extension is not an image's


# --- reading sources -------------------------------------------------------------------


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def source_path(params: IngestParams, root: Path | None = None) -> Path:
    """``ingest.path`` as a path; a relative one is relative to the project ``root``."""
    path = Path(params.path).expanduser()
    return path if path.is_absolute() or root is None else root / path


def url_files(params: IngestParams) -> dict[str, dict]:
    """For a URL source: the files ingest reads there ({path relative to the URL: its size
    and version}), the Fashion-MNIST idx files or the visible image files of a class-folder
    tree. Raises, naming the URL, when they are not there."""
    entries = sources.listing(params.path)
    if params.source == "fashion-mnist":
        wanted = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
        missing = [n for n in wanted if n not in entries]
        if missing:
            raise GraftError(f"ingest.path: {params.path}: Fashion-MNIST files not found there ({', '.join(missing)})")
        return {n: entries[n] for n in wanted}
    found = {rel: info for rel, info in entries.items()
             if not any(part.startswith(".") for part in rel.split("/"))
             and Path(rel).suffix.lower() in images.IMAGE_EXTENSIONS and "/" in rel}  # fmt: skip
    if not found:
        raise GraftError(f"ingest.path: {params.path}: no images in class sub-folders there "
                         f"(looked for {', '.join(images.IMAGE_EXTENSIONS)})")  # fmt: skip
    return found


@contextlib.contextmanager
def readable_source(params: IngestParams, root: Path | None = None) -> Iterator[Path]:
    """The source as a local folder: ``ingest.path`` itself, or, for a URL, a temporary
    copy of the files ingest reads there (removed afterwards)."""
    if sources.is_url(params.path):
        with sources.local_copy(params.path, sorted(url_files(params))) as local:
            yield local
    else:
        yield source_path(params, root)


def check_source(params: IngestParams, root: Path | None = None) -> None:
    """Fail early, naming ``ingest.path`` and what to set, when the source is not there.
    Cheap (no file is read): the orchestrator calls it before handing over to DVC."""
    if sources.is_url(params.path):
        url_files(params)
        return
    path = source_path(params, root)
    (_check_fashion_mnist if params.source == "fashion-mnist" else _check_imagefolder)(path)


def _check_fashion_mnist(path: Path) -> None:
    missing = [n for files in FASHION_MNIST_FILES.values() for n in files if not (path / n).is_file()]
    if missing:
        raise GraftError(
            f"ingest.path: {path}: Fashion-MNIST files not found ({', '.join(missing)}). "
            "Install them with `apt-get install dataset-fashion-mnist` (or `make data`), "
            "or set ingest.path to the folder that holds the idx files."
        )


def _check_imagefolder(path: Path) -> None:
    if not path.exists():
        raise GraftError(
            f"ingest.path: {path}: no such directory. Set ingest.path to a folder with one sub-folder per "
            "class, e.g. `graft run --set ingest.path=/path/to/images` (or edit params.yaml)."
        )
    if not path.is_dir():
        raise GraftError(f"ingest.path: {path}: not a directory. ingest.path must be a folder with one sub-folder per class.")


def read_fashion_mnist(root: Path) -> Source:
    """The original idx files, train/test split kept; images become grayscale PNGs."""
    _check_fashion_mnist(root)
    candidates: list[Candidate] = []
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        pixels = _read_idx(root / img_name, 16).reshape(-1, 28, 28)
        labels = _read_idx(root / lbl_name, 8)
        if len(pixels) != len(labels):
            raise GraftError(f"{root / img_name}: {len(pixels)} images but {len(labels)} labels")
        for i, (img, lbl) in enumerate(zip(pixels, labels, strict=True)):
            candidates.append(
                Candidate(
                    split=split,
                    class_name=FASHION_MNIST_CLASSES[int(lbl)],
                    path=f"{img_name}#{i}",
                    suffix=".png",
                    read=lambda img=img: _png_bytes(img),
                )
            )
    return Source(candidates, FASHION_MNIST_CLASSES, [])


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_imagefolder(root: Path) -> tuple[list[tuple[str, str, Path]], tuple[str, ...], list[str]]:
    """The images of a class-folder source as (split, class, path), its classes (every
    class folder, empty ones included), and the non-image files it ignores."""
    _check_imagefolder(root)
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

    found: list[tuple[str, str, Path]] = []
    ignored: list[str] = []
    for split, class_dir in layout:
        for f in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in f.relative_to(root).parts):
                continue
            if f.suffix.lower() not in images.IMAGE_EXTENSIONS:
                ignored.append(f.relative_to(root).as_posix())
                continue
            found.append((split, class_dir.name, f))
    if not found:
        raise GraftError(
            f"{root}: no images found (looked for {', '.join(images.IMAGE_EXTENSIONS)} "
            f"in {len(layout)} class folder(s)). Put the images in one sub-folder per class."
        )
    return found, tuple(sorted({c.name for _, c in layout})), ignored


def read_imagefolder(root: Path) -> Source:
    """One sub-folder per class, optionally under ``train/`` and ``test/``."""
    found, classes, ignored = _list_imagefolder(root)
    candidates = [Candidate(split, cls, f.relative_to(root).as_posix(), f.suffix.lower(), f.read_bytes)
                  for split, cls, f in found]  # fmt: skip
    return Source(candidates, classes, ignored)


def source_files(params: IngestParams, root: Path | None = None) -> tuple[Path, list[Path], tuple[str, ...]]:
    """What ingest would read, without reading it: the source path, the files that count
    and the classes. One listing for ingest and the data sensor, so a file ingest ignores
    (a README.txt) never triggers a retraining."""
    path = source_path(params, root)
    check_source(params, root)
    if params.source == "fashion-mnist":
        return path, [path / n for pair in FASHION_MNIST_FILES.values() for n in pair], FASHION_MNIST_CLASSES
    found, classes, _ = _list_imagefolder(path)
    return path, [f for _, _, f in found], classes


# --- the pure core ---------------------------------------------------------------------


def subsample(
    candidates: list[Candidate], max_per_class: dict[str, int | None], seed: int
) -> list[Candidate]:
    """Keep at most ``max_per_class[split]`` samples of each (split, class), chosen
    uniformly with ``seed``; the kept samples stay in their original order."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault((c.split, c.class_name), []).append(i)
    keep: list[int] = []
    for key in sorted(groups):
        idx = groups[key]
        limit = max_per_class.get(key[0])
        if limit is not None and len(idx) > limit:
            idx = sorted(rng.choice(idx, size=limit, replace=False).tolist())
        keep.extend(idx)
    return [candidates[i] for i in sorted(keep)]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: identical input gives an identical archive
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_snapshot(chosen: list[Candidate], classes: tuple[str, ...], out_dir: Path) -> pd.DataFrame:
    """Write ``images.tar`` and return the manifest (one row per chosen sample)."""
    index = {name: i for i, name in enumerate(classes)}
    rows = []
    width = max(6, len(str(len(chosen))))
    with tarfile.open(out_dir / "images.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for n, c in enumerate(progress(chosen, desc="ingest", unit="img")):
            data = c.read()
            info = images.inspect(data)
            sample_id = f"{n:0{width}d}"
            member = f"{sample_id}{c.suffix}"
            _tar_member(tar, member, data)
            rows.append(
                {
                    "id": sample_id,
                    "label": index.get(c.class_name, -1),
                    "class_name": c.class_name,
                    "split": c.split,
                    "sha256": fsio.sha256_bytes(data),
                    "width": info.width,
                    "height": info.height,
                    "mode": info.mode,
                    "path": c.path,
                    "member": member,
                    "error": info.error,
                }
            )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return manifest.astype({"width": "Int64", "height": "Int64"})


def ingest(params: IngestParams, out_dir: Path) -> tuple[pd.DataFrame, tuple[str, ...], list[str]]:
    """Read the source, subsample, write the snapshot into ``out_dir``."""
    with readable_source(params) as root:
        if params.source == "fashion-mnist":
            source = read_fashion_mnist(root)
        else:
            source = read_imagefolder(root)
        classes = params.classes if params.classes is not None else source.classes
        chosen = subsample(
            source.candidates,
            {"train": params.max_train_per_class, "test": params.max_test_per_class},
            params.seed,
        )
        manifest = write_snapshot(chosen, classes, out_dir)
    manifest.to_csv(out_dir / "manifest.csv", index=False, lineterminator="\n")
    fsio.write_json(out_dir / "classes.json", list(classes))
    return manifest, classes, source.ignored


def read_manifest(raw_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Load ``manifest.csv`` and ``classes.json`` from an ingest output directory."""
    manifest_path, classes_path = raw_dir / "manifest.csv", raw_dir / "classes.json"
    for p in (manifest_path, classes_path):
        if not p.is_file():
            raise GraftError(f"{p}: not found. Run the ingest stage first (`dvc repro ingest`).")
    manifest = pd.read_csv(
        manifest_path,
        dtype={"id": str, "class_name": str, "split": str, "sha256": str, "path": str,
               "member": str, "mode": str, "error": str},
        keep_default_na=False,
        na_values={"width": [""], "height": [""], "label": [""]},
    ).astype({"width": "Int64", "height": "Int64"})
    manifest["error"] = manifest["error"].replace("", None)
    manifest["mode"] = manifest["mode"].replace("", None)
    with open(classes_path, encoding="utf-8") as f:
        classes = json.load(f)
    return manifest, classes


# --- the thin main ---------------------------------------------------------------------


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.ingest",
        description="Snapshot the image source named in params.yaml (section 'ingest') "
        "into a tar of images, a manifest and a class list.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    params = load_section(IngestParams, "ingest", args.params)
    with fsio.atomic_dir(args.out) as tmp:
        manifest, classes, ignored = ingest(params, tmp)

    counts = manifest.groupby(["split"]).size().to_dict()
    bad = int(manifest["error"].notna().sum())
    print(
        f"ingest: {len(manifest)} images from {params.source} ({params.path}), "
        f"{len(classes)} classes, splits {counts} -> {args.out}"
    )
    if bad:
        print(f"ingest: {bad} file(s) could not be decoded; validate will list them")
    if ignored:
        shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        print(f"ingest: ignored {len(ignored)} non-image file(s): {shown}")


if __name__ == "__main__":
    main()
