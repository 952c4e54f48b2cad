"""Prepared arrays written and read a few rows at a time (graft/base/arrays.py)."""

import pickle

import numpy as np
import pytest

from graft.base.arrays import NpyReader, NpyWriter
from graft.base.errors import GraftError


@pytest.fixture
def stored(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (300, 6, 5, 3), dtype=np.uint8)
    with NpyWriter(tmp_path / "x.npy", np.uint8, a.shape) as w:
        for i in np.random.default_rng(1).permutation(len(a)):  # rows arrive in any order
            w.write(int(i), a[i])
    return a, tmp_path / "x.npy"


def test_written_rows_are_a_plain_npy(stored, tmp_path):
    a, path = stored
    assert np.array_equal(np.load(path), a)
    b = np.arange(24, dtype=np.float32).reshape(4, 6)
    with NpyWriter(tmp_path / "f.npy", np.float32, b.shape) as w:
        w.write(1, b[1:3])  # a block of consecutive rows
        w.write(0, b[0])
        w.write(3, b[3:])
    assert np.array_equal(np.load(tmp_path / "f.npy"), b)
    with pytest.raises(ValueError, match="do not fit"):
        NpyWriter(tmp_path / "g.npy", np.float32, (2, 6)).write(1, b[:2])


def test_reader_indexes_like_the_array(stored):
    a, path = stored
    x = NpyReader(path)
    assert len(x) == 300 and x.shape == a.shape and x.dtype == a.dtype and x.nbytes == a.nbytes
    rng = np.random.default_rng(2)
    for idx in (np.sort(rng.choice(300, 64, replace=False)), rng.choice(300, 64), np.array([5, 3, 3, 299, 0, 1, 2]),
                np.array([-1, -300]), np.array([], dtype=np.int64), np.arange(300) % 7 == 0):
        assert np.array_equal(x[idx], a[idx]), idx
    assert np.array_equal(x[10:20], a[10:20]) and np.array_equal(x[::7], a[::7]) and np.array_equal(x[280:400], a[280:])
    assert np.array_equal(x[-1], a[-1]) and np.array_equal(np.asarray(x), a) and np.array_equal(np.stack(list(x)), a)
    assert np.array_equal(pickle.loads(pickle.dumps(x))[[4, 2]], a[[4, 2]])  # as a DataLoader worker gets it
    with pytest.raises(IndexError):
        x[300]
    with pytest.raises(IndexError):
        x[np.array([0, 300])]


def test_damaged_files_are_named(stored, tmp_path):
    a, path = stored
    short = tmp_path / "short.npy"
    short.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(GraftError, match="short.npy: shorter than its header says"):
        NpyReader(short)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not an array")
    with pytest.raises(GraftError, match="junk.npy: not an array"):
        NpyReader(junk)
    with pytest.raises(GraftError, match="missing.npy: not found"):
        NpyReader(tmp_path / "missing.npy")
