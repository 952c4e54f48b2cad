"""``params.yaml`` parsed into typed, frozen sections.

``params.yaml`` is the only source of hyperparameters. Each stage reads its own section
(named like the stage) through :func:`load_section`; an unknown key, a missing key or a
value of the wrong type is an error that names the key, so a typo never falls back to a
default silently.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from graft.base.errors import ParamsError  # raised here, defined in base so base can catch it

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


def _check(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for alt in args:
            try:
                return _check(value, alt, key)
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
        return tuple(_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
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
        return parse(tp, value, key)
    raise TypeError(f"unsupported parameter type {tp!r} for {key}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def parse(cls: type[T], data: Any, section: str) -> T:
    """Build the frozen dataclass ``cls`` from a mapping; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ParamsError(f"{section}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known keys of '{section}': {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{section}.{name}"
        if name in data:
            kwargs[name] = _check(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params.yaml: missing key {key}")
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
    import importlib

    module, cls = SECTION_TYPES[name].split(":")
    return getattr(importlib.import_module(module), cls)


# Every section of params.yaml and the stage type that parses it (module:class), so a
# whole file can be checked before a run starts instead of failing at the stage that
# reads a bad key. `graft run` imports all these modules before Prefect's temporary
# server can start, so they import pandas (0.3 s) inside the functions that use it.
SECTION_TYPES = {
    "ingest": "graft.data.snapshot:IngestParams",
    "validate": "graft.data.validation:ValidateParams",
    "preprocess": "graft.data.splits:PreprocessParams",
    "load_pretrained": "graft.models.backbone:LoadPretrainedParams",
    "fine_tune": "graft.training.fine_tune:FineTuneParams",
    "distill": "graft.training.teacher:DistillParams",
    "drift": "graft.drift.gate:DriftParams",
    "register": "graft.registry.register:RegisterParams",
}


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
