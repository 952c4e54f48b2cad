"""What graft needs to know about a backbone before any weights are loaded.

The preprocessing a backbone expects (input channels, interpolation, mean and std) comes
from timm's pretrained config for the architecture named in ``params.yaml``
(``load_pretrained.architecture``). ``preprocess`` and ``load_pretrained`` both ask
:func:`preprocessing_config`, so there is no second copy to drift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from stages.common import GraftError


@dataclass(frozen=True)
class LoadPretrainedParams:
    architecture: str  # a timm model name, e.g. tf_efficientnet_lite0
    # packaged:efficientnet_lite0 | file:<path> | timm:<name> | scratch:<architecture>
    source: str
    drop_rate: float = 0.2  # dropout before the new classifier head


@dataclass(frozen=True)
class PreprocessingConfig:
    in_chans: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # PIL resampling name: bicubic, bilinear, ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def preprocessing_config(architecture: str) -> PreprocessingConfig:
    import timm

    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture.split('_')[0]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise GraftError(
            f"params.yaml: load_pretrained.architecture '{architecture}' is not a timm model.{hint}"
        )
    cfg = timm.get_pretrained_cfg(architecture)
    if cfg is None:  # an architecture timm knows without any pretrained config
        return PreprocessingConfig(3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    return PreprocessingConfig(
        in_chans=int(cfg.input_size[0]),
        mean=tuple(float(x) for x in cfg.mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in cfg.std),  # type: ignore[arg-type]
        interpolation=cfg.interpolation or "bilinear",
    )
