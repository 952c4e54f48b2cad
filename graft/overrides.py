"""A whole ``params.yaml`` checked before a run, and ``--set`` overrides written into it.

Every section is parsed with its stage's type, then the sections are checked against
each other (a text source with an image backbone, pixel levers on texts, a TTA the
modality cannot do), so a bad key fails before any stage starts. It sits above the
domain layer because those cross-checks ask the modality and the model.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from graft import modalities
from graft.base.errors import GraftError, ParamsError
from graft.base.fsio import write_text
from graft.config.params import (
    SECTION_TYPES,
    IngestParams,
    LoadPretrainedParams,
    parse,
    parse_value,
    pixel_names,
    read_params,
    section_type,
    set_override,
)
from graft.data.snapshot import check_source
from graft.modalities import backbone
from graft.models import modeling


def check_inputs(params: dict[str, Any], root: Path) -> None:
    """What must exist before anything runs, named with its key: the ingest source and a
    ``file:`` backbone (found otherwise only when their stage runs, after the ones before it)."""
    check_source(parse(IngestParams, params.get("ingest"), "ingest"), root)
    backbone.check_source(parse(LoadPretrainedParams, params.get("load_pretrained"), "load_pretrained"), root)


def check_all(params: dict[str, Any]) -> None:
    """Parse every known section, then check that the backbone suits the data's modality
    (a text source with an image backbone, say); raise ParamsError naming the first bad key."""
    parsed: dict[str, Any] = {}
    for section in SECTION_TYPES:
        cls = section_type(section)
        if section not in params:
            raise ParamsError(f"params.yaml: missing section '{section}'")
        try:
            parsed[section] = parse(cls, params[section], section)
        except GraftError as e:
            raise ParamsError(str(e)) from None
    try:
        modalities.for_source(parsed["ingest"].source).check_backbone(parsed["load_pretrained"])
    except GraftError as e:
        raise ParamsError(f"{e} (ingest.source {parsed['ingest'].source} is {modalities.for_source(parsed['ingest'].source).SAMPLES}; "
                          "`graft run --preset text` or `--preset image` sets every key a modality needs)") from None

    try:
        modeling.check_tta(modalities.for_source(parsed["ingest"].source), parsed["fine_tune"].tta, "params.yaml: fine_tune.tta")
    except GraftError as e:
        raise ParamsError(str(e)) from None
    ft, modality = parsed["fine_tune"], modalities.for_source(parsed["ingest"].source)
    pixel_keys = ft.pixel_levers()
    if pixel_keys and not modality.MIXABLE:
        raise ParamsError(f"params.yaml: {pixel_names(pixel_keys)} {'are' if len(pixel_keys) > 1 else 'is'} for images, and "
                          f"ingest.source {parsed['ingest'].source} is {modality.SAMPLES}; "
                          f"set {'them' if len(pixel_keys) > 1 else 'it'} to 0")  # fmt: skip


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``params`` with ``section.key=value`` overrides applied and checked."""

    out = copy.deepcopy(params)
    for assignment in overrides:
        set_override(out, assignment)
    check_all(out)
    return out


def write_overrides(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Check ``overrides`` against every stage's types, then write them into the params
    file, keeping its comments and layout (a round trip through ruamel.yaml, as DVC does)."""

    path = Path(path)
    checked = apply_overrides(read_params(path), overrides)
    rt = YAML()
    rt.preserve_quotes = True
    # ruamel writes None as an empty value; keep the file's explicit `null`s.
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text(encoding="utf-8"))
    for assignment in overrides:
        dotted, raw = assignment.split("=", 1)
        name, key = dotted.strip().split(".")
        doc[name][key] = parse_value(raw)
    buf = io.StringIO()
    rt.dump(doc, buf)

    write_text(path, buf.getvalue())
    return checked
