"""Stage ``preprocess``: split, then encode every sample with its modality's Encoder (images: decoded, RGB, resized; texts: tokenized); store compact arrays.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.preprocess``): it reads its
params section, calls :mod:`graft.data.splits` and writes the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graft import modalities
from graft.base import fsio
from graft.base.archive import SNAPSHOT
from graft.config.params import DEFAULT_PARAMS, LoadPretrainedParams, PreprocessParams, load_section
from graft.data.snapshot import read_manifest
from graft.data.splits import preprocess
from graft.stage import stage_main


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.preprocess",
        description="Split the validated snapshot and store encoded arrays (resized images, token ids) for training.",
    )
    parser.add_argument("--raw", required=True, type=Path, help="ingest output directory")
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    parser.add_argument("--metrics", required=True, type=Path, help="split metrics JSON to write")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    params = load_section(PreprocessParams, "preprocess", args.params)
    backbone = load_section(LoadPretrainedParams, "load_pretrained", args.params)
    manifest, classes = read_manifest(args.raw)
    with fsio.atomic_dir(args.out) as tmp:
        metrics = preprocess(manifest, classes, args.raw / SNAPSHOT, params, backbone, tmp)
    fsio.write_json(args.metrics, metrics)
    modality = modalities.of_folder(args.out)
    sizes = ", ".join(f"{s} {n}" for s, n in metrics["samples"].items())
    spec = fsio.read_json(args.out / "meta.json")["input"]
    print(f"preprocess: {sizes} {modality.SAMPLES} at {modality.describe_input(spec)} -> {args.out}")

if __name__ == "__main__":
    main()
