"""Stage ``load_pretrained``: the backbone named in params.yaml, with a new classifier
head for the target's classes, saved with its preprocessing config.

Later stages read the preprocessing (size, mean/std, interpolation) from the saved
``model.json``, never from a second copy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import fsio, modeling
from stages.backbone import LoadPretrainedParams, build, preprocessing_config
from stages.common import stage_main
from stages.config import DEFAULT_PARAMS, load_section


def load_pretrained(params: LoadPretrainedParams, prepared_meta: dict, seed: int):
    """Build the model for the prepared data's classes; return it and its config."""
    pre = preprocessing_config(params.architecture)
    backbone = build(params, num_classes=len(prepared_meta["classes"]), seed=seed)
    cfg = modeling.ModelConfig(
        architecture=params.architecture,
        classes=list(prepared_meta["classes"]),
        drop_rate=params.drop_rate,
        image_size=int(prepared_meta["image_size"]),
        mean=list(pre.mean),
        std=list(pre.std),
        interpolation=prepared_meta["interpolation"],
        resize=prepared_meta["resize"],
        source=params.source,
        weights_sha256=backbone.weights_sha256,
    )
    return backbone.model, cfg


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
    meta = fsio.read_json(args.prepared / "meta.json")
    model, cfg = load_pretrained(params, meta, params.seed)
    counts = modeling.count_parameters(model)
    with fsio.atomic_dir(args.out) as tmp:
        modeling.save(tmp, model, cfg, extra={"parameters": counts["total"]})
    sha = (cfg.weights_sha256 or "none (random init)")[:12]
    print(
        f"load_pretrained: {cfg.architecture} from {cfg.source} (weights sha256 {sha}), "
        f"{counts['total'] / 1e6:.2f} M parameters, new head for {len(cfg.classes)} classes -> {args.out}"
    )


if __name__ == "__main__":
    main()
