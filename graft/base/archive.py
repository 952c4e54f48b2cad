"""The raw snapshot's archive format: ``samples.tar``, one member per sample (an encoded
image, a UTF-8 text) with fixed metadata, so the same input gives the same bytes, and
read back one member at a time, so a snapshot of any size takes the memory of one sample.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Container, Iterator
from pathlib import Path

SNAPSHOT = "samples.tar"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: identical input gives an identical archive
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    tar.members.clear()  # type: ignore[attr-defined]  # TarFile keeps every member it wrote; millions here


def iter_snapshot(tar_path: Path, wanted: Container[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the snapshot's samples, in archive order, one at a time
    (only those in ``wanted``, if given). TarFile remembers every member it has read
    (about 1 KB each), so this walks with ``next()`` and forgets them: reading a snapshot
    of any size takes the memory of one sample."""
    with tarfile.open(tar_path, "r") as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()  # type: ignore[attr-defined]  # a real attribute that typeshed leaves out
            if member.isfile() and (wanted is None or member.name in wanted):
                yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]
