"""Stage ``load_pretrained``: the backbone named in params.yaml, with a new classifier head for the target's classes, saved with its input config.

The stage's entry point, as ``dvc.yaml`` runs it (``python -m stages.load_pretrained``): it reads its
params section, calls :mod:`graft.models.pretrained` and writes the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graft.base import fsio
from graft.config.params import DEFAULT_PARAMS, LoadPretrainedParams, load_section
from graft.models import modeling
from graft.models.pretrained import load_pretrained
from graft.stage import stage_main


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.load_pretrained",
        description="Load the pretrained backbone (params.yaml, section 'load_pretrained') and "
        "give it a new head for the prepared data's classes.",
    )
    parser.add_argument("--prepared", required=True, type=Path, help="preprocess output directory")
    parser.add_argument("--out", required=True, type=Path, help="model directory (replaced atomically)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file")
    args = parser.parse_args(argv)

    params = load_section(LoadPretrainedParams, "load_pretrained", args.params)
    with fsio.atomic_dir(args.out) as tmp:
        model, cfg = load_pretrained(params, args.prepared, tmp / modeling.ASSETS)
        counts = modeling.count_parameters(model)
        modeling.save(tmp, model, cfg, extra={"parameters": counts["total"]})
    sha = (cfg.weights_sha256 or "none (random init)")[:12]
    print(
        f"load_pretrained: {cfg.architecture} from {cfg.source} (weights sha256 {sha}), "
        f"{counts['total'] / 1e6:.2f} M parameters, new head for {len(cfg.classes)} classes -> {args.out}"
    )

if __name__ == "__main__":
    main()
