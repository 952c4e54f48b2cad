"""Stage ``validate``: the data gate. A Great Expectations suite, defined in code, runs
on the ingest manifest; any failed check exits non-zero so nothing downstream runs.

Each check carries the risk it guards against, and the report names the offending rows
(with their file paths), so a person can fix the source and rerun.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from graft import modalities
from graft.base.errors import GraftError
from graft.config.params import ValidateParams
from graft.data.snapshot import MANIFEST_COLUMNS

if TYPE_CHECKING:  # imported where used: graft.config.params.SECTION_TYPES says why
    import pandas as pd

MAX_EXAMPLES = 10  # offending rows listed per failed check
CLASS_CHANGE_CHECK = "same classes as the last accepted run"




@dataclass
class Check:
    name: str
    expectation: str
    success: bool
    severity: Literal["error", "warning"] = "error"
    unexpected_count: int = 0
    observed: Any = None
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ValidationResult:
    success: bool
    checks: list[Check]
    n_rows: int
    class_counts: dict[str, int]
    class_change: dict[str, list[str]] | None  # {"added": [...], "removed": [...]}

    def to_json(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "rows": self.n_rows,
            "class_counts": self.class_counts,
            "class_change": self.class_change,
            "checks": [vars(c) for c in self.checks],
        }


def _jsonable(v: Any) -> Any:
    """A value the JSON report can hold: numpy scalars unwrapped, NaN and infinities as null."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _gx_context():
    import great_expectations as gx  # Great Expectations: ~3.7 s of import, paid by the data gate only
    from great_expectations.data_context.types.base import ProgressBarsConfig  # Great Expectations: imported where used

    ctx = gx.get_context(mode="ephemeral")
    # GE's "Calculating Metrics" bars ignore TQDM_DISABLE and would flood DVC's log.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return ctx


def _run_suite(ctx, name: str, df: pd.DataFrame, expectations: list[tuple[str, Any]], index_col: str):
    """Run ``expectations`` (pairs of check name and GE expectation) on ``df``."""
    import great_expectations as gx  # Great Expectations: ~3.7 s of import, paid by the data gate only

    batch = (
        ctx.data_sources.add_pandas(f"{name}_source")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(f"{name}_batch")
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for check_name, exp in expectations:
        exp.meta = {"check": check_name}
        suite.add_expectation(exp)
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    return definition.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [index_col]},
    )


def _to_checks(result, lookup: dict[str, dict[str, Any]] | None, index_col: str) -> list[Check]:
    checks = []
    for r in result.results:
        cfg = r.expectation_config
        info = r.result or {}
        examples = []
        for row in (info.get("unexpected_index_list") or [])[:MAX_EXAMPLES]:
            key = row.get(index_col)
            example = {k: _jsonable(v) for k, v in row.items()}
            if lookup is not None and key in lookup:
                example.update(lookup[key])
            examples.append(example)
        exc = r.exception_info or {}
        observed = info.get("observed_value")
        if not r.success and exc.get("raised_exception"):
            observed = f"could not run: {exc.get('exception_message')}"
        checks.append(
            Check(
                name=cfg.meta.get("check", cfg.type),
                expectation=f"{cfg.type}({', '.join(f'{k}={v!r}' for k, v in cfg.kwargs.items() if k not in ('batch_id', 'value_set'))})",
                success=bool(r.success),
                unexpected_count=int(info.get("unexpected_count") or 0),
                observed=_jsonable(observed) if not isinstance(observed, list) else [_jsonable(x) for x in observed],
                examples=examples,
            )
        )
    return checks


def class_count_table(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Samples per declared class, and each class's size relative to the smallest
    non-empty class (an empty class has no ratio: the minimum-count check names it)."""
    import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

    counts = manifest["class_name"].value_counts() if "class_name" in manifest else pd.Series(dtype=int)
    table = pd.DataFrame({"class_name": classes, "count": [int(counts.get(c, 0)) for c in classes]})
    present = table.loc[table["count"] > 0, "count"]
    smallest = present.min() if len(present) else 0
    table["ratio_to_smallest"] = (table["count"] / smallest).where(table["count"] > 0) if smallest else float("nan")
    return table


def split_class_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """For each split of the source (train, test): how many classes it has samples of."""
    import pandas as pd  # pandas: ~0.5 s of import, paid where a table is read

    rows = []
    if {"split", "class_name"} <= set(manifest.columns):
        for split, group in manifest.groupby("split", sort=True):
            found = sorted(group["class_name"].dropna().unique())
            rows.append({"split": split, "classes": len(found), "found": ", ".join(found)})
    return pd.DataFrame(rows, columns=["split", "classes", "found"])


def one_label_per_sample(df: pd.DataFrame, modality) -> Any:
    """False on the rows of a sample that carries two labels (equal bytes; texts: equal up
    to case and whitespace): a labelling mistake, whose rows teach and score opposite answers."""
    key = df[modality.leak_key].fillna(df["sha256"]) if modality.leak_key in df and "sha256" in df else df.get("sha256")
    if key is None or "class_name" not in df:
        return True
    labels = df.assign(_key=key)[df["class_name"].notna()].groupby("_key")["class_name"].nunique()
    return ~key.isin(labels.index[labels > 1])


def validate(
    manifest: pd.DataFrame,
    classes: list[str],
    params: ValidateParams,
    accepted_classes: list[str] | None = None,
    modality=None,
    context: dict[str, Any] | None = None,
) -> ValidationResult:
    """Run the suite on a manifest; pure apart from Great Expectations' in-memory context.
    The shared checks (columns, labels, splits, class sizes) are here; ``modality`` (its
    module) adds its own (decoding, sizes, leaks); ``context`` is what those may need
    beyond the manifest (text: the snapshot and the tokenizer, to count tokens)."""
    import great_expectations.expectations as gxe  # Great Expectations: ~3.7 s of import, paid by the data gate only

    modality = modality or modalities.get(None)
    if not classes:
        raise GraftError("classes.json is empty: no classes were declared or found")
    df = manifest.copy()
    if "sha256" in df and "split" in df:
        train, test = set(df.loc[df.split == "train", "sha256"]), set(df.loc[df.split == "test", "sha256"])
        df["in_train_and_test"] = df["sha256"].isin(train & test)
    else:
        df["in_train_and_test"] = False
    df["one_label_per_sample"] = one_label_per_sample(df, modality)
    lookup = (
        df.set_index("id")[["path", "class_name"]].rename(columns={"class_name": "label"}).fillna("").to_dict("index")
        if {"id", "path", "class_name"} <= set(df.columns) else None
    )  # fmt: skip

    required = ["id", "label", "class_name", "split", "sha256", "path", "member"]
    columns = [*MANIFEST_COLUMNS, *modality.MANIFEST_COLUMNS]
    row_checks: list[tuple] = [
        # A manifest from another tool or an older graft would make later stages misread it.
        ("manifest has every column", gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=False)),
        *[(f"{c} is never empty", gxe.ExpectColumnValuesToNotBeNull(column=c)) for c in required],
        # A label outside the declared set would silently become a new or wrong class.
        ("every label is a declared class", gxe.ExpectColumnValuesToBeInSet(column="class_name", value_set=list(classes))),
        ("split is train or test", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "test"])),
        ("no sample carries two labels", gxe.ExpectColumnValuesToBeInSet(column="one_label_per_sample", value_set=[True]),
         *(["warning"] if params.on_conflicting_labels == "warn" else [])),
        *modality.expectations(df, params, context),
    ]  # fmt: skip
    table = class_count_table(df, classes)
    class_checks: list[tuple[str, Any]] = [
        # Too few samples: the class cannot be learnt or evaluated (an empty folder, say).
        (f"every class has at least {params.min_per_class} samples",
         gxe.ExpectColumnValuesToBeBetween(column="count", min_value=params.min_per_class)),
        # Heavy imbalance: accuracy rewards predicting the majority class.
        (f"largest / smallest class <= {params.max_imbalance:g}",
         gxe.ExpectColumnValuesToBeBetween(column="ratio_to_smallest", max_value=params.max_imbalance)),
    ]  # fmt: skip
    if accepted_classes is not None:
        # Classes that appear or vanish between runs change what the model means.
        class_checks.append(
            (CLASS_CHANGE_CHECK,
             gxe.ExpectColumnDistinctValuesToEqualSet(column="class_name", value_set=list(accepted_classes)))
        )  # fmt: skip

    splits = split_class_table(df)
    split_checks: list[tuple[str, Any]] = [
        # One class is no classification: a model trained or scored on it is 100 % "right".
        ("every split has at least two classes", gxe.ExpectColumnValuesToBeBetween(column="classes", min_value=2)),
    ]

    ctx = _gx_context()
    warn = {name for name, *rest in row_checks if rest[1:] == ["warning"]}
    checks = _to_checks(_run_suite(ctx, "manifest", df, [(n, e) for n, e, *_ in row_checks], "id"), lookup, "id")
    for c in checks:
        if c.name in warn:
            c.severity = "warning"
    checks += _to_checks(_run_suite(ctx, "class_counts", table, class_checks, "class_name"), None, "class_name")
    if len(splits):
        found = splits.set_index("split")[["found"]].rename(columns={"found": "classes found"}).to_dict("index")
        checks += _to_checks(_run_suite(ctx, "splits", splits, split_checks, "split"), found, "split")

    change = None
    if accepted_classes is not None:
        added = sorted(set(classes) - set(accepted_classes))
        removed = sorted(set(accepted_classes) - set(classes))
        change = {"added": added, "removed": removed}
        if params.on_class_change == "warn":
            next(c for c in checks if c.name == CLASS_CHANGE_CHECK).severity = "warning"
    success = all(c.success or c.severity == "warning" for c in checks)
    counts = dict(zip(table["class_name"], table["count"].astype(int).tolist(), strict=True))
    return ValidationResult(success, checks, len(df), counts, change)


def _finding(c: Check, result: ValidationResult) -> str:
    """What a failed check found, in its own terms (not the expectation's wording)."""
    if c.name == CLASS_CHANGE_CHECK and result.class_change:
        added, removed = result.class_change["added"], result.class_change["removed"]
        return "; ".join(x for x in (f"added {', '.join(added)}" if added else "", f"removed {', '.join(removed)}" if removed else "") if x)
    if c.unexpected_count:
        unit = {"every split has at least two classes": "split(s)"}.get(c.name, "sample(s)" if c.examples and "path" in c.examples[0] else "row(s)")
        return f"{c.unexpected_count} {unit}"
    return f"observed {c.observed}" if c.observed is not None else "see the JSON report"


def format_summary(result: ValidationResult, manifest_path: Path) -> str:
    failed = [c for c in result.checks if not c.success]
    head = "passed" if result.success else "FAILED"
    lines = [
        f"validate: {head}: {len(result.checks) - len(failed)} of {len(result.checks)} checks "
        f"passed on {result.n_rows} samples ({manifest_path})"
    ]
    for c in failed:
        mark = "warning" if c.severity == "warning" else "failed"
        lines.append(f"  {mark}: {c.name}: {_finding(c, result)}")
        lines.append(f"      {c.expectation}")
        for ex in c.examples:
            split = ex.get("split") if "classes found" in ex else None  # a split-level finding
            where = ex.pop("path", None) or ex.get("id") or ex.get("class_name") or (f"the {split} split" if split else "")
            rest = ", ".join(f"{k}={v}" for k, v in ex.items() if k not in ("id",) and not (split and k == "split"))
            lines.append(f"      {where}: {rest}")
        if c.unexpected_count > len(c.examples):
            lines.append(f"      ... and {c.unexpected_count - len(c.examples)} more (see the JSON report)")
    if not result.success:
        if any(c.name == CLASS_CHANGE_CHECK and not c.success and c.severity == "error" for c in result.checks):
            lines.append(
                "The class list changed since the last accepted run. If that is intended, set "
                "validate.on_class_change to warn (params.yaml, or `graft run --set validate.on_class_change=warn`)."
            )
        if any(not c.success and c.severity == "error" and c.name != CLASS_CHANGE_CHECK for c in result.checks):
            lines.append(
                "Fix or remove the files listed above in the source (or change the bounds in "
                "params.yaml, section 'validate'), then run the pipeline again."
            )
    return "\n".join(lines)
