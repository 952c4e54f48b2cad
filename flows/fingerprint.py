"""The ingest source's fingerprint, and the one the last successful training run accepted.

The fingerprint reads file names, sizes and modification times (nothing is copied or
hashed in full), so a check of a large image folder costs a directory walk. Without
Prefect: the data sensor's flow (``flows/sensor.py``) and the training flow use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from graft.base import fsio
from graft.base.errors import GraftError
from graft.config.params import IngestParams, load_section
from graft.data import sources
from graft.data.snapshot import source_files, source_path, url_files

ACCEPTED = Path(".graft") / "accepted_source.json"


def fingerprint(root: Path) -> dict[str, Any]:
    """``{"path", "files", "fingerprint"}`` of the ingest source named in params.yaml:
    the names, sizes and modification times of exactly the files ingest reads, and the
    class list. A source that is missing or broken gets a fingerprint of its error, so
    the run it triggers fails with ingest's own message."""
    params = load_section(IngestParams, "ingest", root / "params.yaml")
    h = hashlib.sha256()
    if sources.is_url(params.path):  # the same listing, through DVC's filesystem for the URL
        try:
            entries = url_files(params)
        except GraftError as e:
            h.update(f"error\0{e}".encode())
            return {"path": params.path, "files": 0, "fingerprint": h.hexdigest(), "error": str(e)}
        for rel, info in sorted(entries.items()):
            h.update(f"{rel}\0{info['size']}\0{info['version']}\n".encode())
        return {"path": params.path, "files": len(entries), "fingerprint": h.hexdigest()}
    try:
        src, files, classes = source_files(params, root)
    except GraftError as e:
        h.update(f"error\0{e}".encode())
        return {"path": str(source_path(params, root)), "files": 0, "fingerprint": h.hexdigest(), "error": str(e)}
    h.update(json.dumps(list(classes)).encode())
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        h.update(f"{f.relative_to(src).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(src), "files": len(files), "fingerprint": h.hexdigest()}


def last_accepted(root: Path) -> dict[str, Any] | None:
    path = root / ACCEPTED
    return json.loads(path.read_text()) if path.is_file() else None


def record_accepted(root: Path, fp: dict[str, Any]) -> None:
    fsio.write_json(root / ACCEPTED, fp)
