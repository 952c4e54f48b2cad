"""``params.yaml`` parsed into typed, frozen sections.

``params.yaml`` is the only source of hyperparameters. Each stage reads its own section
(named like the stage) through :func:`load_section`; an unknown key, a missing key or a
value of the wrong type is an error that names the key, so a typo never falls back to a
default silently.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from graft.base.errors import GraftError, ParamsError  # ParamsError is defined in base so base can catch it

DEFAULT_PARAMS = Path("params.yaml")

T = TypeVar("T")
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found (run from the project root, where params.yaml lives)")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _check(value: Any, tp: Any, key: str, file: str = "params.yaml") -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for alt in args:
            try:
                return _check(value, alt, key, file)
            except ParamsError:
                continue
        raise ParamsError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_check(v, inner, f"{key}[{i}]", file) for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; people mean a number.
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return float(value)
        raise ParamsError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return parse(typing.cast(type, tp), value, key, file)
    raise TypeError(f"unsupported parameter type {tp!r} for {key}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def parse(cls: type[T], data: Any, section: str, file: str = "params.yaml") -> T:
    """Build the frozen dataclass ``cls`` from a mapping; unknown keys are an error that
    names ``file`` and the key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{file}: {section}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{file}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known keys of '{section}': {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{section}.{name}"
        if name in data:
            kwargs[name] = _check(data[name], hints[name], key, file)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{file}: missing key {key}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def load_section(cls: type[T], name: str, path: str | Path = DEFAULT_PARAMS) -> T:
    return section(cls, read_params(path), name, path)


def section(cls: type[T], params: dict[str, Any], name: str, path: str | Path = DEFAULT_PARAMS) -> T:
    """The section ``name`` of an already-read params mapping, parsed into ``cls``."""
    if name not in params:
        raise ParamsError(f"{path}: missing section '{name}'")
    return parse(cls, params[name], name)


def parse_value(raw: str) -> Any:
    """An override's value as YAML, except that ``1e6`` (an exponent without a dot, a
    string to PyYAML's YAML 1.1) is the number a person means."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    return value


def set_override(params: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to a params mapping in place.
    The keys allowed are the fields of the stage's parameter type, whether or not the
    file spells them out (a field with a default may be absent from params.yaml)."""
    if "=" not in assignment:
        raise ParamsError(f"override {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ParamsError(f"override {assignment!r}: expected section.key=value")
    name, key = parts
    if not isinstance(params.get(name), dict):
        raise ParamsError(f"override {assignment!r}: no section '{name}' in params.yaml")
    known = section_fields(name) or list(params[name])
    if key not in known:
        raise ParamsError(f"override {assignment!r}: unknown key '{dotted}'; known: {', '.join(sorted(known))}")
    params[name][key] = parse_value(raw)


def section_fields(name: str) -> list[str]:
    """The keys a params section may hold: its stage type's fields ([] for a section no
    stage declares)."""
    if name not in SECTION_TYPES:
        return []
    return [f.name for f in dataclasses.fields(section_type(name))]


def section_type(name: str) -> type:
    return SECTION_TYPES[name]


# Every section of params.yaml and the stage type that parses it (module:class), so a
# whole file can be checked before a run starts instead of failing at the stage that
# reads a bad key. `graft run` imports all these modules before Prefect's temporary
# server can start, so they import pandas (0.3 s) inside the functions that use it.


PRESETS = Path("presets")


def preset_overrides(name: str, root: str | Path = ".") -> list[str]:
    """A preset (``presets/<name>.yaml``: sections and keys, like params.yaml) as
    ``section.key=value`` overrides, so it is checked and written exactly like --set."""
    folder = Path(root) / PRESETS
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ParamsError(f"no preset '{name}' ({path} not found); known presets: {', '.join(known) or 'none'}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ParamsError(f"{path}: expected sections of keys, like params.yaml")
    return [f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(chr(10) + '...').strip()}"
            for section, keys in data.items() for key, value in keys.items()]  # fmt: skip


# --- the sections -------------------------------------------------------------------
# One frozen type per params.yaml section, named like the stage that reads it. They live
# here, under the stages that use them, so that checking a whole file imports no stage.


@dataclass(frozen=True)
class IngestParams:
    source: Literal["fashion-mnist", "imagefolder", "texttable", "textfolder"]
    path: str
    seed: int
    classes: tuple[str, ...] | None = None  # null: the source's own class list
    max_train_per_class: int | None = None  # null: every training sample
    max_test_per_class: int | None = None
    drop_classes: tuple[str, ...] = ()  # classes of the source left out (rotten tomatoes' "plot")
    text_column: str = "text"  # texttable: the column holding the text
    label_column: str = "label"  # texttable: the column holding the class

    def validate(self) -> None:
        for key in ("max_train_per_class", "max_test_per_class"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise GraftError(f"params.yaml: ingest.{key} must be >= 1 or null, got {value}")


@dataclass(frozen=True)
class ValidateParams:
    min_per_class: int  # samples per class, all splits together
    max_imbalance: float  # largest class count / smallest class count
    min_side: int  # images: pixels; smaller images carry too little to learn from
    max_side: int  # images: pixels; larger ones are probably not what was meant (or a bomb)
    on_class_change: Literal["fail", "warn"]  # classes added/removed since the last accepted run
    on_long_text: Literal["fail", "warn"] = "warn"  # texts: longer than preprocess.max_length tokens


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int  # images: pixels, square; what the model is trained and served at
    val_fraction: float  # share of the source's train split held out for validation
    test_fraction: float  # share carved out for test, only when the source has no test split
    resize: Literal["center_crop", "squash"]  # images: keep aspect ratio and crop, or stretch
    seed: int
    max_length: int = 128  # texts: tokens kept per text (longer ones are cut; validate counts them)

    def validate(self) -> None:
        if self.image_size < 8:
            raise GraftError(f"params.yaml: preprocess.image_size must be >= 8, got {self.image_size}")
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if not 0.0 < v < 1.0:
                raise GraftError(f"params.yaml: preprocess.{key} must be between 0 and 1, got {v}")
        if self.max_length < 2:
            raise GraftError(f"params.yaml: preprocess.max_length must be >= 2, got {self.max_length}")


@dataclass(frozen=True)
class LoadPretrainedParams:
    # images: a timm model name, e.g. tf_efficientnet_lite0; texts: the encoder's model
    # type (bert); auto: the one the source implies
    architecture: str
    # images: packaged:efficientnet_lite0 | file:<path> | timm:<name> | scratch:<architecture>
    # texts: packaged:minilm-l6 | hf:<model id> | file:<folder> | scratch:<packaged name or folder>
    source: str
    drop_rate: float = 0.2  # dropout before the new classifier head
    seed: int = 42  # initialises the new head (and the whole model for scratch:)


# Levers that change a training image's pixels: images only, and not on cached features.
PIXEL_LEVERS = ("mixup_alpha", "cutmix_alpha", "erase_prob", "randaug_ops")


def pixel_names(keys: list[str]) -> str:
    return " and ".join(f"fine_tune.{k}" for k in keys)


@dataclass(frozen=True)
class FineTuneParams:
    mode: Literal["feature_extraction", "partial", "full"]
    epochs: int  # upper bound; early stopping may end sooner
    batch_size: int
    lr: float  # peak learning rate of the head (after warm-up)
    weight_decay: float  # AdamW's decoupled decay
    warmup_epochs: float  # linear warm-up, then cosine decay to zero
    label_smoothing: float
    patience: int  # epochs without a better validation accuracy before stopping
    seed: int
    frozen_groups: int = 0  # partial: leading layer groups kept frozen (group 0: stem / embeddings)
    head_epochs: int = 0  # gradual unfreezing: epochs that train the head alone first
    lr_decay: float = 1.0  # discriminative LRs: group k below the head gets lr * lr_decay**k
    hflip: bool = True  # images: augmentation by random horizontal flip
    crop_padding: int = 0  # images: augmentation by a random crop after padding by this many pixels
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    channels_last: bool = True  # 1.5 to 2.7 times faster on CPU (stack-notes.md)
    eval_batch_size: int = 256  # predictions per batch: validation here, the test split in evaluate
    nproc: int = 1  # processes (ranks) under torchrun with DistributedDataParallel; batch_size stays the global batch
    sync_batchnorm: bool = False  # under torchrun on CUDA: BatchNorm statistics over the global batch
    ema_decay: float = 0.0  # >0: validate and ship an exponential moving average of the weights (0.999, say)
    min_image_size: int | None = None  # images: progressive resizing, the first epoch at this size, growing to full
    tta: str = "none"  # none | a test-time view of the modality (images: hflip), saved with the model
    mixup_alpha: float = 0.0  # images: >0 blends each training image with another, weight ~ Beta(a, a)
    cutmix_alpha: float = 0.0  # images: >0 pastes a box of another image, area ~ Beta(a, a); both >0: one per batch
    erase_prob: float = 0.0  # images: each training image gets a random box of noise with this probability
    randaug_ops: int = 0  # images: RandAugment, this many random ops per training image (timm's); 0 = off
    randaug_magnitude: int = 9  # their strength on timm's scale, 0 to 10 (drawn around it, std 0.5)

    def validate(self) -> None:
        checks = {  # key: (valid, what is)
            "epochs": (self.epochs >= 1, "1 or more"), "batch_size": (self.batch_size >= 1, "1 or more"),
            "lr": (self.lr > 0, "above 0"), "patience": (self.patience >= 1, "1 or more"),
            "frozen_groups": (self.frozen_groups >= 0, "0 or more"), "head_epochs": (self.head_epochs >= 0, "0 or more"),
            "lr_decay": (0 < self.lr_decay <= 1, "above 0, at most 1"),
            "warmup_epochs": (self.warmup_epochs >= 0, "0 or more"), "crop_padding": (self.crop_padding >= 0, "0 or more"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "0 or more, below 1"),
            "eval_batch_size": (self.eval_batch_size >= 1, "1 or more"), "nproc": (self.nproc >= 1, "1 or more"),
            "ema_decay": (0 <= self.ema_decay < 1, "0 (off) or more, below 1"),
            "min_image_size": (self.min_image_size is None or self.min_image_size >= 8, "null (off) or 8 or more"),
            "mixup_alpha": (self.mixup_alpha >= 0, "0 (off) or more"), "cutmix_alpha": (self.cutmix_alpha >= 0, "0 (off) or more"),
            "erase_prob": (0 <= self.erase_prob <= 1, "0 to 1"),
            "randaug_ops": (0 <= self.randaug_ops <= 10, "0 (off) to 10"),
            "randaug_magnitude": (0 <= self.randaug_magnitude <= 10, "0 to 10"),
        }  # fmt: skip
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise GraftError(f"params.yaml: fine_tune.{key} has an invalid value: {getattr(self, key)!r} (allowed: {allowed})")
        pixel = self.pixel_levers()
        if self.mode == "feature_extraction" and pixel:
            raise GraftError(f"params.yaml: {pixel_names(pixel)} {'need' if len(pixel) > 1 else 'needs'} mode partial or "
                             "full: feature_extraction trains the head on cached features of the unaugmented samples; "
                             f"set {'them' if len(pixel) > 1 else 'it'} to 0")  # fmt: skip

    def pixel_levers(self) -> list[str]:
        """The keys of :data:`PIXEL_LEVERS` this run sets."""
        return [k for k in PIXEL_LEVERS if getattr(self, k)]


@dataclass(frozen=True)
class DistillParams:
    teacher: str | list[str] | None = None  # None: no distillation (a list arrives as a tuple)
    temperature: float = 4.0  # softens both distributions; the KL term is scaled by T^2
    alpha: float = 0.7  # weight of the teacher's term; 1 - alpha goes to the labels' cross-entropy

    def validate(self) -> None:
        if not self.temperature > 0:
            raise GraftError(f"params.yaml: distill.temperature must be > 0, got {self.temperature!r}")
        if not 0 <= self.alpha <= 1:
            raise GraftError(f"params.yaml: distill.alpha must be between 0 and 1, got {self.alpha!r}")
        if self.teacher is not None and not isinstance(self.teacher, str) and not self.teacher:
            raise GraftError("params.yaml: distill.teacher is an empty list; use null for no teacher")
        for ref in self.references:
            if not ref.strip():
                raise GraftError("params.yaml: distill.teacher has an empty entry")

    @property
    def references(self) -> list[str]:
        if self.teacher is None:
            return []
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)


FOLDS = 5  # of the domain classifier's cross-validation


@dataclass(frozen=True)
class DriftParams:
    on_drift: str = "warn"  # warn: report and go on; fail: stop before training (exit code 2)
    alpha: float = 0.05  # the test's level: the chance of a false alarm when nothing moved
    # what new data is compared with: champion (or another alias), name@alias, name/version,
    # a reference folder (data/reference of a run); null: no test (the reference is still written)
    reference: str | None = "champion"
    max_samples: int = 2000  # samples embedded per side; a seeded random sample above it
    min_samples: int = 20  # fewer on a side (overall, or in a class): that test is skipped, with a warning
    permutations: int = 500  # of the MMD permutation test; its smallest p-value is 1/(permutations+1)
    seed: int = 42

    def validate(self) -> None:
        if self.on_drift not in ("warn", "fail"):
            raise GraftError(f"params.yaml: drift.on_drift must be warn or fail, got {self.on_drift!r}")
        if not 0 < self.alpha < 1:
            raise GraftError(f"params.yaml: drift.alpha must be between 0 and 1, got {self.alpha!r}")
        if self.min_samples < FOLDS:
            raise GraftError(f"params.yaml: drift.min_samples must be at least {FOLDS} (the domain classifier's "
                             f"folds), got {self.min_samples!r}")  # fmt: skip
        if self.max_samples < self.min_samples:
            raise GraftError(f"params.yaml: drift.max_samples ({self.max_samples}) must be at least "
                             f"drift.min_samples ({self.min_samples})")  # fmt: skip
        if 1 / (self.permutations + 1) >= self.alpha:
            raise GraftError(f"params.yaml: drift.permutations {self.permutations} cannot give a p-value under "
                             f"drift.alpha {self.alpha}; use at least {math.ceil(1 / self.alpha)}")  # fmt: skip
        if self.reference is not None and not str(self.reference).strip():
            raise GraftError("params.yaml: drift.reference is empty; use null for no drift test")


@dataclass(frozen=True)
class GateParams:
    min_accuracy: float  # absolute floor on test accuracy for a champion
    min_improvement: float  # accuracy points the candidate must gain over the champion
    require_significance: bool  # also require McNemar's p < alpha
    alpha: float
    max_latency_ms: float | None = None  # a champion predicts one sample within this (batch 1)


@dataclass(frozen=True)
class RegisterParams:
    model_name: str  # registered model name in MLflow
    min_accuracy: float  # a model below this test accuracy never becomes champion
    min_improvement: float  # accuracy points a candidate must gain over the champion
    require_significance: bool = False  # also require McNemar p < alpha
    alpha: float = 0.05
    max_latency_ms: float | None = None  # a champion must predict one sample within this (batch 1); None: no limit

    def validate(self) -> None:
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise GraftError(f"params.yaml: register.max_latency_ms must be > 0 or null, got {self.max_latency_ms!r}")

    @property
    def gate(self) -> GateParams:
        return GateParams(self.min_accuracy, self.min_improvement, self.require_significance, self.alpha,
                          self.max_latency_ms)


# Every section of params.yaml and the type that parses it, so a whole file can be checked
# before a run starts instead of failing at the stage that reads a bad key.
SECTION_TYPES: dict[str, type] = {
    "ingest": IngestParams,
    "validate": ValidateParams,
    "preprocess": PreprocessParams,
    "load_pretrained": LoadPretrainedParams,
    "fine_tune": FineTuneParams,
    "distill": DistillParams,
    "drift": DriftParams,
    "register": RegisterParams,
}


# --- a param that names a model: a folder, or a registry reference ---------------------

_VERSION = re.compile(r"^(?:(?P<name>[^/@\s]+)/)?(?P<version>\d+)$")
_ALIAS = re.compile(r"^(?:(?P<name>[^/@\s]+)@)?(?P<alias>[A-Za-z_][\w-]*)$")


def parse_reference(ref: str, model_name: str, key: str = "distill.teacher", what: str = "model directory",
                    folder: str = "graft model folder (with model.json and weights.pt, e.g. models/fine_tuned of another project)",
                    ) -> tuple[str, str, str] | Path:  # fmt: skip
    """A directory (a path that exists, or one written like a path), or a registry
    reference as (name, "version" | "alias", value); bare versions and aliases belong to
    ``model_name``. ``key``, ``what`` and ``folder`` say in messages which param it is and what it wants."""
    ref = ref.strip()
    looks_like_path = ref.startswith(("/", "./", "../", "~")) or ref.endswith("/")
    path = Path(ref).expanduser()
    if path.exists() or looks_like_path:
        if not path.is_dir():
            raise GraftError(f"{key}: {ref}: no such {what}. Name a {folder} "
                             "or a registered model (champion, name@alias, name/version).")  # fmt: skip
        return path
    if m := _VERSION.match(ref):
        return (m["name"] or model_name, "version", m["version"])
    if m := _ALIAS.match(ref):
        return (m["name"] or model_name, "alias", m["alias"])
    raise GraftError(f"{key}: '{ref}' is neither a {what} nor a registry reference "
                     "(champion, name@alias, name/version, a version number)")  # fmt: skip
