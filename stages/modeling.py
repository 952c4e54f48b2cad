"""A saved graft model (weights plus the config needed to rebuild and feed it), and the
one way images become model inputs. Training, evaluation, the promotion gate and the
registered model all go through :func:`to_input`, so they normalise identically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages import fsio
from stages.common import GraftError

WEIGHTS, CONFIG = "weights.pt", "model.json"


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    classes: list[str]
    drop_rate: float
    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str
    resize: str
    source: str
    weights_sha256: str | None  # of the pretrained weights the model started from

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def resolve_device(name: str = "auto"):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_input(batch: np.ndarray, cfg: ModelConfig, device, channels_last: bool = True):
    """uint8 (N, H, W, 3) images to normalised float (N, 3, H, W) on ``device``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def predict_proba(model, images: np.ndarray, cfg: ModelConfig, device=None, batch_size: int = 256,
                  channels_last: bool = True, desc: str | None = None) -> np.ndarray:
    """Class probabilities (N, C) for uint8 images, in eval mode, without gradients."""
    import torch

    from stages.common import progress

    device = device or next(model.parameters()).device
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    with torch.inference_mode():
        for s in progress(starts, desc=desc, unit="batch", disable=desc is None):
            logits = model(to_input(images[s : s + batch_size], cfg, device, channels_last))
            out.append(logits.float().softmax(dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(cfg.classes)), dtype=np.float32)


def create(cfg: ModelConfig):
    import timm

    return timm.create_model(cfg.architecture, num_classes=len(cfg.classes), drop_rate=cfg.drop_rate)


def save(out_dir: Path, model, cfg: ModelConfig, extra: dict[str, Any] | None = None) -> None:
    """Write weights and config into ``out_dir`` (callers swap the directory in atomically)."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Through a file object: given a path, torch.save names the archive's inner folder
    # after the (random) temporary file, and equal weights got different bytes and DVC
    # hashes on every run, so no other machine's run-cache entry could ever match.
    with fsio.atomic_path(out_dir / WEIGHTS) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    fsio.write_json(out_dir / CONFIG, {**cfg.__dict__, **(extra or {})})


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise GraftError(f"{path}: not found; is {model_dir} a graft model directory?")
    return ModelConfig.from_json(fsio.read_json(path))


def load(model_dir: Path, device=None):
    """Rebuild a saved model (weights loaded strictly) and return it with its config."""
    import torch

    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    model = create(cfg)
    state = torch.load(model_dir / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    if device is not None:
        model.to(device)
    return model.eval(), cfg


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}
