"""dvc.yaml lists every line a stage can run: each stage's ``deps`` cover the import
closure of its entry module (function-level imports, importlib look-ups by name and the
modality registry included), so editing any library code a stage runs reruns the stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("graft", "stages", "flows")
# importlib look-ups written as "package.module:attribute" (params section types)
NAMED = re.compile(r"^((?:graft|stages|flows)(?:\.\w+)+):\w+$")


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, package: str) -> set[str]:
    """Every graft module ``path`` may import, wherever the import statement stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = NAMED.match(node.value)
            if m:
                found.add(m.group(1))
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module"):
            # a package that looks its own modules up by name (the modality registry):
            # any of them may run
            found.update(f"{package}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__")
    return {n for n in found if n.split(".")[0] in LIBRARY and module_file(n)}


def closure(entry: str) -> set[Path]:
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        assert path is not None, name
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        parents = [".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))]
        todo.extend(p for p in parents if module_file(p))
        todo.extend(imported_names(path, package))
    return {module_file(n).relative_to(ROOT) for n in seen}  # type: ignore[union-attr]


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_dvc_yaml_lists_every_module_a_stage_can_run(stage):
    spec = dvc_stages()[stage]
    entry = re.search(r"python -m (stages\.\w+)", spec["cmd"]).group(1)
    code_deps = [d for d in spec["deps"] if isinstance(d, str) and d.split("/")[0] in LIBRARY]
    files = closure(entry)
    missing = sorted(str(p) for p in files if not covered(p, code_deps))
    assert not missing, f"dvc.yaml: stage {stage} runs {missing} but does not list them under deps"
    # and nothing more: a folder the stage never imports would rerun it for nothing
    unused = sorted(d for d in code_deps if not any(covered(p, [d]) for p in files))
    assert not unused, f"dvc.yaml: stage {stage} lists {unused} under deps but never imports them"


def test_the_closure_sees_function_level_imports_and_the_modality_registry():
    files = closure("stages.fine_tune")
    assert Path("graft/training/fine_tune.py") in files
    assert Path("graft/modalities/text.py") in files  # found through the modality registry
    # the layers keep the gate out of the stages before register: editing it reruns register only
    assert Path("graft/promotion/gate.py") not in closure("stages.drift")
    assert Path("graft/promotion/gate.py") in closure("stages.register")


def test_editing_library_code_a_stage_runs_makes_dvc_rerun_it(tmp_path):
    """The failure mode itself, through real DVC: record preprocess as done, then change a
    function it runs from the library (not its entry module): `dvc status` must say so."""
    import json

    from tests.conftest import copy_project, dvc

    project = copy_project(tmp_path / "project")
    for out in ("data/raw/manifest.csv", "data/prepared/meta.json", "reports/validation.json", "reports/preprocess.json"):
        (project / out).parent.mkdir(parents=True, exist_ok=True)
        (project / out).write_text("{}\n")
    dvc(project, "commit", "--force", "preprocess")
    assert json.loads(dvc(project, "status", "--json", "preprocess").stdout) == {}

    # code preprocess never runs (the promotion gate) leaves it up to date
    gate = project / "graft" / "promotion" / "gate.py"
    gate.write_text(gate.read_text() + "\n# edited\n")
    assert json.loads(dvc(project, "status", "--json", "preprocess").stdout) == {}

    splits = project / "graft" / "data" / "splits.py"
    text = splits.read_text()
    assert "def assign_splits(" in text
    splits.write_text(text.replace("def assign_splits(", "def assign_splits(  # edited\n    ", 1))
    status = json.loads(dvc(project, "status", "--json", "preprocess").stdout)
    changed = [c for entry in status.get("preprocess", []) if isinstance(entry, dict)
               for c in entry.get("changed deps", {})]  # fmt: skip
    assert "graft/data" in changed, status


def test_a_registered_model_ships_every_module_its_pyfunc_can_import(tmp_path):
    from graft.models import serving

    shipped = serving.serving_code(tmp_path)
    needed = closure("graft.models.serving_model")
    missing = sorted(str(p) for p in needed if not (tmp_path / p).is_file())
    assert not missing, f"serving.SERVING_CODE misses {missing}"
    assert not (shipped / "training").exists() and not (shipped / "promotion").exists()
