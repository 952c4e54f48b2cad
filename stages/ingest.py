"""Stage ``ingest``: a source of labelled samples (images, texts) to a canonical raw snapshot.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.ingest``): it reads its
params section, calls :mod:`graft.data.snapshot` and writes the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graft import modalities
from graft.base import fsio
from graft.config.params import DEFAULT_PARAMS, IngestParams, load_section
from graft.data.snapshot import ingest
from graft.stage import stage_main


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.ingest",
        description="Snapshot the source named in params.yaml (section 'ingest'): images or texts "
        "into a tar of samples, a manifest and a class list.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    params = load_section(IngestParams, "ingest", args.params)
    with fsio.atomic_dir(args.out) as tmp:
        manifest, classes, ignored = ingest(params, tmp)

    counts = manifest.groupby(["split"]).size().to_dict()
    bad = int(manifest["error"].notna().sum())
    what = modalities.for_source(params.source).SAMPLES
    print(
        f"ingest: {len(manifest)} {what} from {params.source} ({params.path}), "
        f"{len(classes)} classes, splits {counts} -> {args.out}"
    )
    if bad:
        print(f"ingest: {bad} sample(s) could not be decoded; validate will list them")
    if ignored:
        shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        print(f"ingest: ignored {len(ignored)} file(s) that are not {what}: {shown}")

if __name__ == "__main__":
    main()
