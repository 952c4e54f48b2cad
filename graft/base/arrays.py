"""Prepared arrays on disk (plain ``.npy``), written and read a few rows at a time.

Every stage that touches a split goes through these two classes, so no stage holds a
whole split in memory and a stage's peak memory does not grow with the dataset.

Why not ``np.load(mmap_mode="r")`` or ``open_memmap``: the pages of a memory map that a
process has touched count in its resident set until the kernel wants them back, so one
training epoch over 60,000 images at 64 px showed as 740 MB more resident memory, the
same as loading the split. Positional reads and writes (``pread``/``pwrite``) leave the
data in the page cache instead: shared, reclaimable, never the process's, and under a
memory limit smaller than the data the kernel simply drops it. Rows are fetched in
sorted order with contiguous runs merged, so a sequential pass is one read per batch and
a shuffled batch of 64 is at most 64 small reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graft.base.errors import GraftError

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buf):  # a single read may return less (2 GiB per call on Linux)
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise GraftError(f"{path}: ends early (truncated?); rerun the stage that wrote it")
        done += n


class NpyWriter:
    """Create ``path`` as an ``.npy`` of ``shape`` and ``dtype`` (the file is sized at
    once, sparse) and fill it in any order with :meth:`write`."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), tuple(int(s) for s in shape)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            self.offset = f.tell()
            f.truncate(self.offset + self.shape[0] * self.row_bytes)
        self._fd = os.open(self.path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (one row, or a block of consecutive rows) at row ``start``."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape == self.row_shape:
            rows = rows[None]
        if rows.shape[1:] != self.row_shape or not 0 <= start <= self.shape[0] - len(rows):
            raise ValueError(f"{self.path}: rows {rows.shape} at {start} do not fit an array of shape {self.shape}")
        if not rows.size:
            return
        data = memoryview(rows).cast("B")  # type: ignore[arg-type]  # an ndarray is a buffer (stubs)
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self.offset + start * self.row_bytes + done)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


class NpyReader:
    """A read-only ``.npy`` that indexes like an array (``len``, ``shape``, ``x[i]``,
    ``x[a:b]``, ``x[index_array]``) and reads only the rows asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise GraftError(f"{self.path}: not found")
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = _HEADER_READERS[version](f)
            except (ValueError, KeyError) as e:
                raise GraftError(f"{self.path}: not an array graft wrote ({e}); rerun the stage that wrote it") from e
            self.offset = f.tell()
        if fortran or dtype.hasobject or not shape:
            raise GraftError(f"{self.path}: an array graft cannot read in pieces ({dtype}, {shape})")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        if self.path.stat().st_size < self.offset + self.shape[0] * self.row_bytes:
            raise GraftError(f"{self.path}: shorter than its header says (truncated?); rerun the stage that wrote it")
        self._fd, self._pid = -1, -1  # no descriptor yet, for no process

    # Opened lazily, and again after a fork or unpickling (DataLoader workers), so every
    # process has its own descriptor.
    def _descriptor(self) -> int:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": -1}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def _rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), *self.row_shape), dtype=self.dtype)
        if out.size:
            _pread_into(self._descriptor(), memoryview(out).cast("B"), self.offset + start * self.row_bytes, self.path)  # type: ignore[arg-type]
        return out

    def __getitem__(self, key) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self._rows(i, i + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._rows(start, stop)
            return self[np.arange(start, stop, step)]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for {n} rows")
        order = np.argsort(idx, kind="stable")
        wanted = idx[order]
        out = np.empty((len(idx), *self.row_shape), dtype=self.dtype)
        if not len(idx) or not self.row_bytes:
            return out
        # Runs of consecutive rows: one read each, straight into the output.
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(wanted)], strict=True):
            _pread_into(self._descriptor(), memoryview(out[lo:hi]).cast("B"),  # type: ignore[arg-type]
                        self.offset + int(wanted[lo]) * self.row_bytes, self.path)  # fmt: skip
        if np.any(order != np.arange(len(order))):
            unsorted = np.empty_like(out)
            unsorted[order] = out
            return unsorted
        return out

    def __iter__(self):
        for s in range(0, len(self), 1024):
            yield from self._rows(s, min(s + 1024, len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole array in memory: for small arrays and tests, never for a split."""
        a = self._rows(0, len(self))
        return a if dtype is None else a.astype(dtype)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0 and getattr(self, "_pid", None) == os.getpid():
            os.close(self._fd)
