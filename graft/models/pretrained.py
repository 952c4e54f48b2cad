"""Stage ``load_pretrained``: the backbone named in params.yaml, with a new classifier
head for the target's classes, saved with its input config.

The modality (from the prepared data) knows how to build its backbone: a timm network
for images, a transformer encoder for texts. Later stages read the input config (image
size, mean/std, interpolation; tokenizer and max length) from the saved ``model.json``
and ``assets/``, never from a second copy.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from graft import modalities
from graft.base import fsio
from graft.config.params import LoadPretrainedParams
from graft.models import modeling


def load_pretrained(params: LoadPretrainedParams, prepared: Path, assets: Path, seed: int | None = None):
    """Build the model for the prepared data's classes; return it and its config. The
    prepared data's assets (a tokenizer) are copied into ``assets`` first: the model
    serves with what it was trained on. ``seed`` (default: load_pretrained.seed)
    initialises the new head."""

    if seed is not None:
        params = dataclasses.replace(params, seed=seed)
    meta = fsio.read_json(prepared / "meta.json")
    modality = modalities.of_folder(prepared)
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
