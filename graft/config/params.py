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
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from graft.base.errors import GraftError, ParamsError  # ParamsError is defined in base so base can catch it

DEFAULT_PARAMS = Path("params.yaml")

T = TypeVar("T")
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(value: Any) -> Any:
    # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; people mean a number.
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    return value


# The scalar types of a section: strict, so `"3"` is not an integer and `1` not true (a
# typo is an error, never a silent conversion), except that an integer is a number and
# `1e-4` is too. A list in YAML is a tuple here (sections are frozen).
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_number), Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Strs = tuple[Str, ...]


# A params or graft.yaml section: a frozen pydantic dataclass (positional construction, as
# in the tests and the drift gate) whose unknown keys are errors.
SECTION = ConfigDict(extra="forbid")


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found (run from the project root, where params.yaml lives)")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "tuple_type": "a list", "none_required": "null",
             "dataclass_type": "a mapping of keys", "dataclass_exact_type": "a mapping of keys",
             "dict_type": "a mapping of keys"}  # fmt: skip
_KINDS = {"str": "a string", "int": "an integer", "float": "a number", "tuple[str, ...]": "a list of strings"}
_BOUNDS = {"ge": "{} or more", "gt": "above {}", "le": "at most {}", "lt": "below {}"}


def allowed(cls: type, name: str) -> str:
    """A field's allowed range in words, from its constraints (``ge=0, le=1``: "0 to 1")."""
    field = _fields(cls)[name]
    bounds = {k: getattr(m, k) for m in field.metadata for k in _BOUNDS if getattr(m, k, None) is not None}
    low = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    high = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if low and high and low[0] == "ge" and high[0] == "le":
        words = f"{low[1]:g} to {high[1]:g}"
    else:
        words = ", ".join(_BOUNDS[k].format(f"{v:g}") for k, v in (b for b in (low, high) if b))
    return f"{words}, or null" if words and field.default is None else words


def _key(section: str, loc: tuple) -> str:
    return section + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _fields(cls: type) -> dict[str, Any]:
    """A section type's pydantic fields (FieldInfo: annotation, default, constraints), by name."""
    return getattr(cls, "__pydantic_fields__", {})


def _where(cls: type, loc: tuple) -> tuple[type, tuple, tuple]:
    """Walk ``loc`` through nested sections: the innermost section type, the path to its
    key, and what is left (a union's alternative, a list index)."""
    path: tuple = ()
    for i, part in enumerate(loc):
        fields = _fields(cls)
        if part not in fields:
            return cls, path, loc[i:]
        path += (part,)
        inner = fields[part].annotation
        if i + 1 < len(loc) and dataclasses.is_dataclass(inner):
            cls = inner  # type: ignore[assignment]
    return cls, path, ()


def _message(e: ValidationError, cls: type, section: str, file: str) -> str:
    """The first problem pydantic found, in the words graft uses: the file, the key and
    what is allowed."""
    errors = e.errors()
    unknown = [er for er in errors if er["type"] in ("unexpected_keyword_argument", "extra_forbidden")]
    if unknown:
        owner, path, _ = _where(cls, tuple(unknown[0]["loc"]))
        names = list(_fields(owner))
        keys = sorted(_key(section, tuple(er["loc"])) for er in unknown)
        return (f"{file}: unknown key(s) {', '.join(keys)}; "
                f"known keys of '{_key(section, path)}': {', '.join(names)}")  # fmt: skip
    er = errors[0]
    kind, value = er["type"], er.get("input")
    if kind == "value_error":  # a check across keys: its own words
        return str(er["ctx"]["error"])
    owner, path, rest = _where(cls, tuple(er["loc"]))
    key = _key(section, path + tuple(p for p in rest if isinstance(p, int)))
    if rest and not isinstance(rest[0], int):  # a union's alternatives (str | list | null): all of them at once
        options = sorted({_KINDS.get(str(x["loc"][len(path)]), str(x["loc"][len(path)])) for x in errors
                          if tuple(x["loc"][: len(path)]) == path and len(x["loc"]) > len(path)})  # fmt: skip
        if _fields(owner)[path[-1]].default is None:
            options.append("null")
        return f"{file}: {key}: expected {' or '.join(options)}, got {value!r}"
    if kind in ("missing", "missing_argument"):
        return f"{file}: missing key {key}"
    if kind in _EXPECTED:
        return f"{file}: {key}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind == "literal_error":
        return f"{file}: {key}: {value!r} is not one of {er['ctx']['expected']}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and not rest:
        return f"{file}: {key} has an invalid value: {value!r} (allowed: {allowed(owner, str(path[-1]))})"
    return f"{file}: {key}: {er['msg']} (got {value!r})"


def parse(cls: type[T], data: Any, section: str, file: str = "params.yaml") -> T:
    """Build the section type ``cls`` from a mapping; unknown keys, missing keys, wrong
    types and values out of range are a :class:`ParamsError` that names ``file`` and the key."""
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ParamsError(f"{file}: {section}: expected a mapping of keys, got {data!r}")
    try:
        return cls(**data)
    except ValidationError as e:
        raise ParamsError(_message(e, cls, section, file)) from None


def replace(obj: T, section: str, **changes: Any) -> T:
    """``obj`` with ``changes``, checked like the file's values (a CLI option, say)."""
    return parse(type(obj), {**{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, **changes}, section)  # type: ignore[arg-type]


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


@dataclass(frozen=True, config=SECTION)
class IngestParams:
    source: Literal["fashion-mnist", "imagefolder", "texttable", "textfolder"] = Field(
        description="where the samples come from: the packaged Fashion-MNIST, a folder of class folders of images, "
        "a table of texts (CSV, TSV, JSON lines, Parquet), or a folder of class folders of text files"
    )
    path: Str = Field(description="the source's file or folder (fashion-mnist: its .npz)")
    seed: Int = Field(description="seeds the per-class sampling below")
    classes: Strs | None = Field(
        default=None, description="the classes kept, in this order; null: the source's own list"
    )
    max_train_per_class: Int | None = Field(
        default=None, ge=1, description="training samples kept per class; null: all"
    )
    max_test_per_class: Int | None = Field(default=None, ge=1, description="test samples kept per class; null: all")
    drop_classes: Strs = Field(default=(), description="classes of the source left out (Rotten Tomatoes' `plot`, say)")
    text_column: Str = Field(default="text", description="texttable: the column that holds the text")
    label_column: Str = Field(default="label", description="texttable: the column that holds the class")


@dataclass(frozen=True, config=SECTION)
class ValidateParams:
    min_per_class: Int = Field(description="samples per class, all splits together, below which the data gate fails")
    max_imbalance: Float = Field(description="the largest class's count over the smallest's, above which it fails")
    min_side: Int = Field(description="images: pixels; a smaller image carries too little to learn from")
    max_side: Int = Field(description="images: pixels; a larger one is probably not what was meant (or a bomb)")
    on_class_change: Literal["fail", "warn"] = Field(
        description="classes added or removed since the last accepted run: stop, or say so and go on"
    )
    on_conflicting_labels: Literal["fail", "warn"] = Field(
        default="warn", description="one sample (equal bytes; texts: equal up to case and whitespace) under two labels: "
        "stop, or say so and go on (its rows stay in one split either way)")
    on_long_text: Literal["fail", "warn"] = Field(
        default="warn", description="texts: longer than preprocess.max_length tokens (they are cut)"
    )


@dataclass(frozen=True, config=SECTION)
class PreprocessParams:
    image_size: Int = Field(ge=8, description="images: pixels, square; what the model is trained and served at")
    val_fraction: Float = Field(gt=0, lt=1, description="share of the source's train split held out for validation")
    test_fraction: Float = Field(
        gt=0, lt=1, description="share carved out for test, only when the source has no test split"
    )
    resize: Literal["center_crop", "squash"] = Field(
        description="images: keep the aspect ratio and crop the centre, or stretch to a square"
    )
    seed: Int = Field(description="seeds the split assignment")
    max_length: Int = Field(
        default=128, ge=2, description="texts: tokens kept per text (longer ones are cut; validate counts them)"
    )


@dataclass(frozen=True, config=SECTION)
class LoadPretrainedParams:
    architecture: Str = Field(description="images: a timm model name (tf_efficientnet_lite0); texts: the encoder's "
                              "model type (bert); auto: the one the source implies")  # fmt: skip
    source: Str = Field(description="images: packaged:efficientnet_lite0 | file:<path> | timm:<name> | "
                        "scratch:<architecture>; texts: packaged:minilm-l6 | hf:<model id> | file:<folder> | "
                        "scratch:<packaged name or folder>")  # fmt: skip
    drop_rate: Float = Field(default=0.2, ge=0, lt=1, description="dropout before the new classifier head")
    seed: Int = Field(default=42, description="initialises the new head (and the whole model for scratch:)")


# Levers that change a training image's pixels: images only, and not on cached features.
PIXEL_LEVERS = ("mixup_alpha", "cutmix_alpha", "erase_prob", "randaug_ops")


def pixel_names(keys: list[str]) -> str:
    return " and ".join(f"fine_tune.{k}" for k in keys)


@dataclass(frozen=True, config=SECTION)
class FineTuneParams:
    mode: Literal["feature_extraction", "partial", "full"] = Field(
        description="feature_extraction: train the head on the frozen backbone's features; partial: also the last "
        "layer groups (fine_tune.frozen_groups stay frozen); full: every weight"
    )
    epochs: Int = Field(ge=1, description="upper bound; early stopping may end sooner")
    batch_size: Int = Field(ge=1, description="samples per optimizer step (the global batch under torchrun)")
    lr: Float = Field(gt=0, description="peak learning rate of the head (after warm-up)")
    weight_decay: Float = Field(ge=0, description="AdamW's decoupled weight decay")
    warmup_epochs: Float = Field(ge=0, description="linear warm-up, then cosine decay to zero")
    label_smoothing: Float = Field(ge=0, lt=1, description="of the cross-entropy's targets")
    patience: Int = Field(ge=1, description="epochs without a better validation accuracy before stopping")
    seed: Int = Field(description="seeds the order of samples, the augmentation and the head")
    frozen_groups: Int = Field(
        default=0, ge=0, description="partial: leading layer groups kept frozen (group 0: stem / embeddings)"
    )
    head_epochs: Int = Field(default=0, ge=0, description="gradual unfreezing: epochs that train the head alone first")
    lr_decay: Float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="discriminative learning rates: group k below the head gets lr * lr_decay**k",
    )
    hflip: Bool = Field(default=True, description="images: augment by a random horizontal flip")
    crop_padding: Int = Field(
        default=0, ge=0, description="images: augment by a random crop after padding by this many pixels"
    )
    device: Str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")
    channels_last: Bool = Field(
        default=True, description="images: the channels-last memory layout (1.5 to 2.7 times faster on CPU)"
    )
    eval_batch_size: Int = Field(
        default=256, ge=1, description="predictions per batch: validation here, the test split in evaluate"
    )
    nproc: Int = Field(
        default=1,
        ge=1,
        description="processes (ranks) under torchrun with DistributedDataParallel; batch_size stays the global batch",
    )
    sync_batchnorm: Bool = Field(
        default=False, description="under torchrun on CUDA: BatchNorm statistics over the global batch"
    )
    ema_decay: Float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="above 0 (0.999, say): validate and ship an exponential moving average of the weights",
    )
    min_image_size: Int | None = Field(
        default=None,
        ge=8,
        description="images: progressive resizing, the first epoch at this size, growing to full; null: off",
    )
    tta: Str = Field(
        default="none", description="none | a test-time view of the modality (images: hflip), saved with the model"
    )
    mixup_alpha: Float = Field(
        default=0.0, ge=0, description="images: above 0 blends each training image with another, weight ~ Beta(a, a)"
    )
    cutmix_alpha: Float = Field(
        default=0.0,
        ge=0,
        description="images: above 0 pastes a box of another image, area ~ Beta(a, a); both above 0: one per batch",
    )
    erase_prob: Float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="images: each training image gets a random box of noise with this probability",
    )
    randaug_ops: Int = Field(
        default=0,
        ge=0,
        le=10,
        description="images: RandAugment, this many random ops per training image (timm's); 0: off",
    )
    randaug_magnitude: Int = Field(
        default=9, ge=0, le=10, description="their strength on timm's scale, 0 to 10 (drawn around it, std 0.5)"
    )

    @model_validator(mode="after")
    def _levers_need_pixels(self) -> FineTuneParams:
        pixel = self.pixel_levers()
        if self.mode == "feature_extraction" and pixel:
            raise ValueError(f"params.yaml: {pixel_names(pixel)} {'need' if len(pixel) > 1 else 'needs'} mode partial or "
                             "full: feature_extraction trains the head on cached features of the unaugmented samples; "
                             f"set {'them' if len(pixel) > 1 else 'it'} to 0")  # fmt: skip
        return self

    def pixel_levers(self) -> list[str]:
        """The keys of :data:`PIXEL_LEVERS` this run sets."""
        return [k for k in PIXEL_LEVERS if getattr(self, k)]


@dataclass(frozen=True, config=SECTION)
class DistillParams:
    teacher: Str | Strs | None = Field(default=None, description="a registered model (champion, name@alias, name/version) or a "
                                       "model folder, or a list of them (an ensemble); null: no distillation")  # fmt: skip
    temperature: Float = Field(
        default=4.0, gt=0, description="softens both distributions; the KL term is scaled by T^2"
    )
    alpha: Float = Field(
        default=0.7, ge=0, le=1, description="weight of the teacher's term; 1 - alpha goes to the labels' cross-entropy"
    )

    @model_validator(mode="after")
    def _teachers(self) -> DistillParams:
        if self.teacher is not None and not isinstance(self.teacher, str) and not self.teacher:
            raise ValueError("params.yaml: distill.teacher is an empty list; use null for no teacher")
        if any(not ref.strip() for ref in self.references):
            raise ValueError("params.yaml: distill.teacher has an empty entry")
        return self

    @property
    def references(self) -> list[str]:
        if self.teacher is None:
            return []
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)


FOLDS = 5  # of the domain classifier's cross-validation


@dataclass(frozen=True, config=SECTION)
class DriftParams:
    on_drift: Literal["warn", "fail"] = Field(
        default="warn", description="warn: report and go on; fail: stop before training (exit code 2)"
    )
    alpha: Float = Field(
        default=0.05, gt=0, lt=1, description="the test's level: the chance of a false alarm when nothing moved"
    )
    reference: Str | None = Field(default="champion", description="what new data is compared with: champion (or another alias), "
                                  "name@alias, name/version, a reference folder (data/reference of a run); null: no test "
                                  "(the reference is still written)")  # fmt: skip
    max_samples: Int = Field(default=2000, description="samples embedded per side; a seeded random sample above it")
    min_samples: Int = Field(default=20, ge=FOLDS, description="fewer on a side (overall, or in a class): that test is skipped, "
                             "with a warning (at least the domain classifier's 5 folds)")  # fmt: skip
    permutations: Int = Field(
        default=500, ge=1, description="of the MMD permutation test; its smallest p-value is 1/(permutations+1)"
    )
    seed: Int = Field(default=42, description="seeds the sample and the permutations")

    @model_validator(mode="after")
    def _consistent(self) -> DriftParams:
        if self.max_samples < self.min_samples:
            raise ValueError(f"params.yaml: drift.max_samples ({self.max_samples}) must be at least "
                             f"drift.min_samples ({self.min_samples})")  # fmt: skip
        if 1 / (self.permutations + 1) >= self.alpha:
            raise ValueError(f"params.yaml: drift.permutations {self.permutations} cannot give a p-value under "
                             f"drift.alpha {self.alpha}; use at least {math.ceil(1 / self.alpha)}")  # fmt: skip
        if self.reference is not None and not self.reference.strip():
            raise ValueError("params.yaml: drift.reference is empty; use null for no drift test")
        return self


@dataclass(frozen=True, config=SECTION)
class GateParams:
    """What a candidate must show to become champion (``register``'s keys, for the gate)."""

    min_accuracy: Float
    min_improvement: Float
    require_significance: Bool
    alpha: Float
    max_latency_ms: Float | None = None


@dataclass(frozen=True, config=SECTION)
class RegisterParams:
    model_name: Str = Field(description="the registered model's name in MLflow")
    min_accuracy: Float = Field(ge=0, le=1, description="a model below this test accuracy never becomes champion")
    min_improvement: Float = Field(
        ge=0,
        description="accuracy points a candidate must gain over the champion (0: any "
        "gain; a candidate never becomes champion without one)",
    )
    require_significance: Bool = Field(default=False, description="also require McNemar's p < alpha")
    alpha: Float = Field(default=0.05, gt=0, lt=1, description="McNemar's test level")
    max_latency_ms: Float | None = Field(default=None, gt=0, description="a champion must predict one sample within this "
                                         "(batch 1); null: no limit")  # fmt: skip

    @property
    def gate(self) -> GateParams:
        return GateParams(
            self.min_accuracy, self.min_improvement, self.require_significance, self.alpha, self.max_latency_ms
        )


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
