"""MkDocs hook: the reference pages, generated from the code so nothing is typed twice.

A page that holds one of the markers below gets it replaced at build time:

- ``<!-- generated: params.yaml -->``: every section of params.yaml, from the pydantic
  sections in ``graft/config/params.py`` (type, default, allowed range, meaning);
- ``<!-- generated: graft.yaml -->``: every key of graft.yaml, from ``graft/config/project.py``;
- ``<!-- generated: cli -->``: every ``graft`` command and option, from the Typer app.

``mkdocs build --strict`` (in ``make test``) fails on a marker this hook does not know.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from pydantic_core import PydanticUndefined

MARKER = re.compile(r"<!-- generated: ([\w.]+) -->")


def _type_name(tp: Any) -> str:
    """A field's type in words a params.yaml writer reads."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}s"
    if origin is dict:
        return f"mapping of {_type_name(args[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if dataclasses.is_dataclass(value) else f"`{value!r}`".replace("()", "[]")
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if value == ():
        return "`[]`"
    return "`null`" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _rows(cls: type, prefix: str) -> list[str]:
    from graft.config.params import allowed

    rows = []
    for name, field in cls.__pydantic_fields__.items():  # type: ignore[attr-defined]
        key = f"{prefix}.{name}"
        inner = field.annotation
        if dataclasses.is_dataclass(inner):
            rows += _rows(inner, key)  # type: ignore[arg-type]
            continue
        meaning = field.description or ""
        bounds = allowed(cls, name)
        if bounds:
            meaning += f" (allowed: {bounds})"
        rows.append(f"| `{key}` | {_type_name(inner)} | {_default(field)} | {_cell(meaning)} |")
    return rows


def _table(cls: type, prefix: str) -> str:
    return "\n".join(["| key | type | default | meaning |", "|---|---|---|---|", *_rows(cls, prefix)])


def params_reference() -> str:
    from graft.config.params import SECTION_TYPES

    out = []
    for section, cls in SECTION_TYPES.items():
        doc = (cls.__doc__ or "").strip()
        out += [f"## `{section}`", "", *([doc, ""] if doc and not doc.startswith(cls.__name__ + "(") else []),
                _table(cls, section), ""]  # fmt: skip
    return "\n".join(out)


def project_reference() -> str:
    from graft.config.project import ProjectConfig, StageOptions

    out = []
    for name, field in ProjectConfig.__pydantic_fields__.items():  # type: ignore[attr-defined]
        out += [f"## `{name}`", "", field.description or "", ""]
        if name == "stages":
            out += ["`stages.default` sets every stage's options; `stages.<stage>` overrides them for one stage.", "",
                    _table(StageOptions, "stages.<stage>"), ""]  # fmt: skip
        else:
            out += [_table(field.annotation, name), ""]
    return "\n".join(out)


def cli_reference() -> str:
    import typer

    from flows.cli import app

    root = typer.main.get_command(app)
    out: list[str] = []

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance)
            for name in cmd.commands:  # in the order the CLI declares them
                walk(cmd.commands[name], [*path, name])
            return
        out.extend([f"## `{' '.join(path)}`", "", (cmd.help or "").strip(), ""])
        rows = []
        for p in cmd.params:
            if p.param_type_name == "argument":
                rows.append(f"| `{p.name.upper()}` | argument | {getattr(p, 'help', '') or ''} |")  # type: ignore[union-attr]
            elif p.param_type_name == "option":
                names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
                default = "" if p.default in (None, False, (), []) or p.is_flag and not p.default else f" (default: `{p.default}`)"
                rows.append(f"| {names} | option | {_cell(p.help or '')}{default} |")
        if rows:
            out.extend(["| name | kind | meaning |", "|---|---|---|", *rows, ""])

    walk(root, ["graft"])
    return "\n".join(out)


GENERATORS = {"params.yaml": params_reference, "graft.yaml": project_reference, "cli": cli_reference}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def replace(m: re.Match) -> str:
        name = m.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: unknown generated block {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)
