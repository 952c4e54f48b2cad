"""Stage ``load_pretrained``: the backbone named in params.yaml, with a new classifier
head for the target's classes, saved with its input config.

The modality (from the prepared data) knows how to build its backbone: a timm network
for images, a transformer encoder for texts. Later stages read the input config (image
size, mean/std, interpolation; tokenizer and max length) from the saved ``model.json``
and ``assets/``, never from a second copy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import fsio, modeling
from stages.backbone import LoadPretrainedParams
from stages.common import stage_main
from stages.config import DEFAULT_PARAMS, load_section
from stages.ingest import read_modality


def load_pretrained(params: LoadPretrainedParams, prepared: Path, assets: Path, seed: int | None = None):
    """Build the model for the prepared data's classes; return it and its config. The
    prepared data's assets (a tokenizer) are copied into ``assets`` first: the model
    serves with what it was trained on. ``seed`` (default: load_pretrained.seed)
    initialises the new head."""
    import dataclasses
    import shutil

    if seed is not None:
        params = dataclasses.replace(params, seed=seed)
    meta = fsio.read_json(prepared / "meta.json")
    modality = read_modality(prepared)
    if (prepared / modeling.ASSETS).is_dir():
        shutil.copytree(prepared / modeling.ASSETS, assets, dirs_exist_ok=True)
    assets.mkdir(parents=True, exist_ok=True)
    built = modality.build(params, len(meta["classes"]), meta["input"], assets)
    cfg = modeling.ModelConfig(
        architecture=built.architecture,
        classes=list(meta["classes"]),
        drop_rate=params.drop_rate,
        source=params.source,
        weights_sha256=built.weights_sha256,
        input=built.input,
        modality=modality.NAME,
    )
    return built.model, cfg


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
