"""Where ``ingest.path`` points: a local folder, or a URL that DVC's own filesystems read
(ssh://, s3://, gs://, azure://, http(s)://), the same ones DVC uses for remotes and
external dependencies. Credentials come from where those filesystems look for them
(``~/.ssh`` for ssh://, the cloud SDKs' environment and files for the others).

For a URL, ``ingest`` reads a local copy of exactly the files it would read, made in a
temporary folder and removed after; ``dvc.yaml`` lists the URL as the stage's dependency,
so DVC notices a change at the source, and the data sensor lists it the same way.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graft.base.errors import GraftError

URL_SCHEMES = ("ssh", "s3", "gs", "azure", "http", "https", "hdfs", "webdav", "webdavs")


def is_url(path: str) -> bool:
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.lower() in URL_SCHEMES


def filesystem(url: str):
    """(DVC filesystem, path on it) for ``url``; a scheme whose extra is not installed is
    named with the package that adds it."""
    from dvc.fs import get_cloud_fs  # DVC's API: ~0.3 s of import (its repo more), paid where the graph is read

    try:
        cls, config, fs_path = get_cloud_fs(None, url=url)
        return cls(**config), fs_path
    except Exception as e:  # an uninstalled plugin, a malformed URL
        scheme = url.partition("://")[0]
        raise GraftError(f"ingest.path: {url}: cannot open it ({e}). Reading {scheme}:// needs DVC's plugin for it "
                         f"(pip install 'dvc[{scheme}]')") from e  # fmt: skip


def _unreachable(url: str, e: BaseException) -> GraftError:
    return GraftError(f"ingest.path: {url}: cannot read it ({type(e).__name__}: {e}). Check the address and that "
                      "this machine's credentials reach it (for ssh://: a key in ~/.ssh and the host in "
                      "~/.ssh/known_hosts)")  # fmt: skip


def listing(url: str) -> dict[str, dict[str, Any]]:
    """Every file under ``url``: {path relative to it: {"size", "version"}}, where
    ``version`` is what the filesystem offers to tell a changed file (a checksum, an ETag
    or a modification time)."""
    fs, base = filesystem(url)
    try:
        if not fs.exists(base):
            raise GraftError(f"ingest.path: {url}: no such file or directory on the remote side. Set ingest.path "
                             "to an existing folder (`graft run --set ingest.path=...`)")  # fmt: skip
        found = fs.fs.find(base, detail=True)  # the fsspec filesystem: DVC's wrapper yields names only
    except GraftError:
        raise
    except Exception as e:
        raise _unreachable(url, e) from e
    out = {}
    prefix = base.rstrip("/") + "/"
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        rel = path[len(prefix) :] if path.startswith(prefix) else path.rsplit("/", 1)[-1]
        version = next((str(info[k]) for k in ("md5", "etag", "ETag", "checksum", "mtime", "LastModified", "time")
                        if info.get(k) is not None), "")  # fmt: skip
        out[rel] = {"size": info.get("size"), "version": version}
    return out


@contextlib.contextmanager
def local_copy(url: str, files: list[str]) -> Iterator[Path]:
    """A temporary local folder holding ``files`` (paths relative to ``url``), removed after."""
    fs, base = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="graft-source-") as tmp:
        root = Path(tmp)
        try:
            for rel in files:
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{base.rstrip('/')}/{rel}", str(dest))
        except Exception as e:
            raise _unreachable(url, e) from e
        yield root
