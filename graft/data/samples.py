"""A split's raw samples, as a registered model takes them: what the gate scores, what a
teacher sees through its own preprocessing, what serving latency is measured on."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from graft import modalities
from graft.base.archive import SNAPSHOT, iter_snapshot
from graft.base.errors import GraftError
from graft.data.snapshot import read_manifest


class RawSamples:
    """One split's raw samples as the registered model takes them (image bytes, texts),
    read from the snapshot a batch at a time: scoring a model holds one batch. Positions
    are those of the prepared split (the order of its arrays: evaluate's for test,
    fine_tune's for train)."""

    def __init__(self, raw_dir: Path, prepared_dir: Path, split: str = "test"):
        self.modality = modalities.of_folder(raw_dir)
        self.snapshot = raw_dir / SNAPSHOT
        manifest, _ = read_manifest(raw_dir, columns=["id", "class_name", "member"])
        self.split = split
        ids = [str(i) for i in np.load(prepared_dir / f"{split}_ids.npy")]
        rows = manifest.set_index("id").loc[ids]
        self.position = dict(zip(rows["member"], range(len(ids)), strict=True))
        self.truth: list[str] = rows["class_name"].tolist()

    def subset(self, positions) -> RawSamples:
        """The samples at ``positions`` of this split, renumbered 0..k-1 in that order."""

        keep = {int(q): i for i, q in enumerate(positions)}
        out = copy.copy(self)
        out.position = {m: keep[q] for m, q in self.position.items() if q in keep}
        out.truth = [self.truth[int(q)] for q in positions]
        return out

    def __len__(self) -> int:
        return len(self.truth)

    def batches(self, size: int = 256):
        """(positions, DataFrame of ``size`` samples), in the snapshot's order."""
        import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

        positions: list[int] = []
        values: list[Any] = []
        seen = 0
        for name, data in iter_snapshot(self.snapshot, self.position):
            positions.append(self.position[name])
            values.append(self.modality.from_raw(data))
            if len(values) == size:
                yield np.asarray(positions), pd.DataFrame({self.modality.INPUT_COLUMN: values})
                seen += len(values)
                positions, values = [], []
        if values:
            yield np.asarray(positions), pd.DataFrame({self.modality.INPUT_COLUMN: values})
            seen += len(values)
        if seen != len(self):
            raise GraftError(f"{self.snapshot}: {len(self) - seen} {self.split} {self.modality.SAMPLES} are missing; rerun ingest")

    def head(self, n: int = 2):
        """The first ``n`` samples of the snapshot (an input example for the model's signature)."""
        return next(iter(self.batches(n)))[1]

    def frame(self):
        """All samples in memory, in the prepared order: for small test splits (tests,
        benchmarks), never for scoring."""
        import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

        values: list[Any] = [None] * len(self)
        for positions, frame in self.batches():
            for pos, v in zip(positions, frame[self.modality.INPUT_COLUMN], strict=True):
                values[pos] = v
        return pd.DataFrame({self.modality.INPUT_COLUMN: values})
