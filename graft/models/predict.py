"""``graft predict``'s work: a registered model classifies samples read from disk, a
batch at a time, into a CSV written atomically (a killed predict leaves no half file)."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.base import fsio
from graft.base.errors import progress


@dataclass
class Predictions:
    total: int = 0
    bad: int = 0  # samples that could not be decoded (a row with the error)
    counts: Counter[str] = field(default_factory=Counter)  # samples per predicted class


def predict_to_csv(pyfunc, kind, inputs: list[tuple[str, Any]], out: Path, batch_size: int = 64,
                   columns: dict[str, dict[str, str]] | None = None) -> Predictions:  # fmt: skip
    """Classify ``inputs`` (the modality's ``read_inputs``: name and a loader each) with
    ``pyfunc`` and write one row per sample: path, the input's own ``columns`` (a table's
    other columns, by sample name), class, probability, error."""
    import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

    result = Predictions()
    with fsio.atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        extra = list(dict.fromkeys(k for row in (columns or {}).values() for k in row))
        writer.writerow(["path", *extra, "class", "probability", "error"])
        for s in progress(range(0, len(inputs), batch_size), desc="predict", unit="batch"):
            chunk = [(sample_name, *load()) for sample_name, load in inputs[s : s + batch_size]]
            good = [value for _, value, error in chunk if not error]
            preds = (pyfunc.predict(pd.DataFrame({kind.INPUT_COLUMN: good})) if good
                     else pd.DataFrame(columns=["class", "probability"]))  # fmt: skip
            it = iter(preds[["class", "probability"]].itertuples(index=False))
            for sample_name, _, error in chunk:
                result.total += 1
                own = [(columns or {}).get(sample_name, {}).get(k, "") for k in extra]
                if error:
                    result.bad += 1
                    writer.writerow([sample_name, *own, "", "", error])
                else:
                    c, p = next(it)
                    result.counts[c] += 1
                    writer.writerow([sample_name, *own, c, f"{float(p):.6f}", ""])
    return result
