"""graft.config.paths names the paths dvc.yaml gives the stages: one fact, two places that
must agree, checked here."""

from pathlib import Path

import yaml

from graft.config import paths

ROOT = Path(__file__).resolve().parents[2]


def test_every_pipeline_path_is_one_dvc_yaml_declares():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = set()
    for stage in spec.values():
        for entry in stage.get("outs", []) + stage.get("deps", []) + stage.get("metrics", []):
            declared.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    named = {str(v) for k, v in vars(paths).items() if k.isupper() and isinstance(v, Path)}
    named -= {str(paths.PARAMS), str(paths.DVC_LOCK)}
    assert named <= declared, f"graft.config.paths names {sorted(named - declared)}, which dvc.yaml does not declare"
    assert (ROOT / paths.PARAMS).is_file()
