"""Stage ``validate``: the data gate. A Great Expectations suite, defined in code, runs on the ingest manifest; any failed check exits non-zero so nothing downstream runs.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.validate``): it reads its
params section, calls :mod:`graft.data.validation` and writes the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graft import modalities
from graft.base import fsio
from graft.base.errors import GraftError
from graft.config.params import DEFAULT_PARAMS, ValidateParams, load_section
from graft.data.snapshot import read_manifest
from graft.data.validation import format_summary, validate
from graft.stage import stage_main


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.validate",
        description="Check the ingest manifest with a Great Expectations suite; exit 1 on any failure.",
    )
    parser.add_argument("--raw", required=True, type=Path, help="ingest output directory")
    parser.add_argument("--report", required=True, type=Path, help="JSON report to write")
    parser.add_argument("--accepted", required=True, type=Path,
                        help="snapshot of the last accepted data (read, then updated on success)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    params = load_section(ValidateParams, "validate", args.params)
    manifest, classes = read_manifest(args.raw)
    modality = modalities.of_folder(args.raw)
    accepted = fsio.read_json(args.accepted) if args.accepted.is_file() else None
    # What a modality's checks may need beyond the manifest (text: the snapshot and the
    # params file, for the backbone's tokenizer and the length limit, to count tokens).
    context = {"raw": args.raw, "params": args.params}
    result = validate(manifest, classes, params, accepted["classes"] if accepted else None, modality, context)
    fsio.write_json(args.report, result.to_json())
    summary = format_summary(result, args.raw / "manifest.csv")
    if not result.success:  # the stage's message: printed once, by stage_main or the flow
        raise GraftError(f"{summary}\n(full report: {args.report})")
    print(summary)
    print(f"validate: report written to {args.report}")
    fsio.write_json(args.accepted, {"classes": list(classes), "class_counts": result.class_counts})

if __name__ == "__main__":
    main()
