"""A saved graft model (weights, the config needed to rebuild and feed it, and the
modality's assets, such as a tokenizer), and the one way encoded samples become model
inputs. Training, evaluation, the promotion gate and the registered model all go
through :func:`to_input`, so they feed the model identically."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graft import modalities
from graft.base import fsio
from graft.base.errors import GraftError, progress

WEIGHTS, CONFIG, ASSETS = "weights.pt", "model.json", "assets"
# Input settings of image models saved before the modality seam, at the top level of model.json.
_LEGACY_IMAGE_INPUT = ("image_size", "mean", "std", "interpolation", "resize")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    classes: list[str]
    drop_rate: float
    source: str
    weights_sha256: str | None  # of the pretrained weights the model started from
    # How a raw sample becomes this model's input, the modality's own: images: image_size,
    # mean, std, interpolation, resize; texts: max_length, tokenizer (a file in assets/).
    input: dict[str, Any] = field(default_factory=dict)
    modality: str = modalities.DEFAULT

    @property
    def kind(self):
        """The modality's module."""
        return modalities.get(self.modality)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if "input" not in d:  # saved before the modality seam: an image model
            d["input"] = {k: d[k] for k in _LEGACY_IMAGE_INPUT if k in d}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str = "auto"):
    import torch  # torch: ~2 s of import, paid where a model runs

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_input(batch: np.ndarray, cfg: ModelConfig, device, channels_last: bool = True):
    """Encoded samples (a batch of preprocess's arrays) to the model's input tensor on ``device``."""
    return cfg.kind.to_input(batch, cfg, device, channels_last)


def check_tta(kind, tta: str, key: str) -> None:
    """Refuse a test-time augmentation the modality ``kind`` does not offer, naming ``key``
    (where the value came from) and the values it does offer."""
    if tta != "none" and tta not in kind.TEST_VIEWS:
        raise GraftError(f"{key}={tta!r} is not a test-time augmentation of {kind.NAME} models; "
                         f"use one of: {', '.join(('none', *kind.TEST_VIEWS))}")  # fmt: skip


def tta_of(cfg: ModelConfig) -> str:
    """The model's test-time augmentation ("none", or a view of its modality's TEST_VIEWS)."""
    return cfg.input.get("tta", "none")


def predict_proba(model, samples: Any, cfg: ModelConfig, device=None, batch_size: int = 256,
                  channels_last: bool = True, desc: str | None = None, tta: str | None = None) -> np.ndarray:
    """Class probabilities (N, C) for encoded samples, in eval mode, without gradients.

    With test-time augmentation (``tta``, by default the model's own, saved in its
    config) the probabilities are the mean over the modality's views of each sample."""
    import torch  # torch: ~2 s of import, paid where a model runs

    device = device or next(model.parameters()).device
    how = tta_of(cfg) if tta is None else tta
    # model.eval() walks and sets every submodule (2.6 ms for EfficientNet-Lite0, a quarter
    # of a served single-image call), and so would a check of each: graft switches modes
    # only through the root (train() then freezing some BatchNorms), so its flag decides.
    if model.training:
        model.eval()
    out = []
    starts = range(0, len(samples), batch_size)
    with torch.inference_mode():
        # No bar object at all when silent: a served call should not pay for building one.
        for s in starts if desc is None else progress(starts, desc=desc, unit="batch"):
            views = cfg.kind.test_views(to_input(samples[s : s + batch_size], cfg, device, channels_last), how)
            probs = sum(model(v).float().softmax(dim=1) for v in views) / len(views)
            out.append(probs.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(cfg.classes)), dtype=np.float32)


def create(cfg: ModelConfig, model_dir: Path | None = None):
    """The untrained network of a saved model (``model_dir`` holds its assets)."""
    return cfg.kind.create(cfg, model_dir)


def save(out_dir: Path, model, cfg: ModelConfig, extra: dict[str, Any] | None = None,
         assets: Path | None = None) -> None:  # fmt: skip
    """Write weights, config and a copy of ``assets`` (a folder: tokenizer, encoder
    config) into ``out_dir`` (callers swap the directory in atomically)."""
    import torch  # torch: ~2 s of import, paid where a model runs

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Through a file object: given a path, torch.save names the archive's inner folder
    # after the (random) temporary file, and equal weights got different bytes and DVC
    # hashes on every run, so no other machine's run-cache entry could ever match.
    with fsio.atomic_path(out_dir / WEIGHTS) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    if assets is not None and Path(assets).is_dir() and Path(assets).resolve() != (out_dir / ASSETS).resolve():
        shutil.copytree(assets, out_dir / ASSETS, dirs_exist_ok=True)
    fsio.write_json(out_dir / CONFIG, {**cfg.to_json(), **(extra or {})})


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise GraftError(f"{path}: not found; is {model_dir} a graft model directory?")
    return ModelConfig.from_json(fsio.read_json(path))


def identity(model_dir: Path) -> str:
    """The sha256 of what a saved model serves: its weights, its config (classes, input,
    test-time augmentation: the :class:`ModelConfig`, not the training's timings written
    beside it) and its assets. Two trainings that end with the same model share it, and
    register keeps one version of a model (:func:`graft.registry.rules.version_of_model`)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256(fsio.sha256_file(model_dir / WEIGHTS).encode())
    h.update(json.dumps(load_config(model_dir).to_json(), sort_keys=True).encode())
    assets = model_dir / ASSETS
    for f in sorted(p for p in assets.rglob("*") if p.is_file()) if assets.is_dir() else []:
        h.update(f"\0{f.relative_to(assets).as_posix()}\0{fsio.sha256_file(f)}".encode())
    return h.hexdigest()


def load(model_dir: Path, device=None):
    """Rebuild a saved model (weights loaded strictly) and return it with its config."""
    import torch  # torch: ~2 s of import, paid where a model runs

    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    model = create(cfg, model_dir)
    state = torch.load(model_dir / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    if device is not None:
        model.to(device)
    return model.eval(), cfg


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}
