"""Figures as graft writes them: matplotlib without a display, PNGs written atomically.

Importing matplotlib costs about 0.5 s, so :func:`pyplot` imports it when a figure is
drawn, not when a stage starts."""

from __future__ import annotations

from pathlib import Path

from graft.base import fsio


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed: CI, workers, servers)."""
    import matplotlib  # 0.5 s of import, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: ~0.6 s of import, paid where a plot is drawn

    return plt


def save_png(fig, path: Path) -> None:
    """Write ``fig`` as a PNG, atomically, and free it."""
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
