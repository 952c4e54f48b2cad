from typing import Literal

import pytest
from pydantic.dataclasses import dataclass

from graft.config.params import (
    SECTION,
    Float,
    IngestParams,
    Int,
    ParamsError,
    Strs,
    load_section,
    parse,
    read_params,
    set_override,
)


@dataclass(frozen=True, config=SECTION)
class Demo:
    size: Int
    rate: Float
    mode: Literal["a", "b"]
    names: Strs | None = None


def test_parse_converts_and_freezes():
    d = parse(Demo, {"size": 3, "rate": 1, "mode": "a", "names": ["x", "y"]}, "demo")
    assert d == Demo(3, 1.0, "a", ("x", "y"))
    with pytest.raises(AttributeError):
        d.size = 4  # type: ignore[misc]


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"demo\.sise"):
        parse(Demo, {"sise": 3, "size": 3, "rate": 1.0, "mode": "a"}, "demo")


def test_missing_and_wrong_type_are_named():
    with pytest.raises(ParamsError, match=r"missing key demo\.rate"):
        parse(Demo, {"size": 3, "mode": "a"}, "demo")
    with pytest.raises(ParamsError, match=r"demo\.size: expected an integer"):
        parse(Demo, {"size": "3", "rate": 1.0, "mode": "a"}, "demo")
    with pytest.raises(ParamsError, match=r"demo\.mode: 'c' is not one of"):
        parse(Demo, {"size": 3, "rate": 1.0, "mode": "c"}, "demo")


def test_project_params_parse(committed_params):
    """The committed params.yaml parses with the stages' own types."""
    params = load_section(IngestParams, "ingest", committed_params)
    assert params.source in ("fashion-mnist", "imagefolder")


def test_override_checks_key_exists(committed_params):
    params = read_params(committed_params)
    set_override(params, "preprocess.image_size=32")
    assert params["preprocess"]["image_size"] == 32
    with pytest.raises(ParamsError, match="unknown key 'preprocess.imagesize'"):
        set_override(params, "preprocess.imagesize=32")
    with pytest.raises(ParamsError, match="expected section.key=value"):
        set_override(params, "preprocess")


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        read_params(tmp_path / "nope.yaml")


def test_overrides_are_checked_against_every_stage_type():
    from graft.overrides import apply_overrides

    params = read_params()
    ok = apply_overrides(params, ["fine_tune.lr=0.01", "ingest.max_train_per_class=null"])
    assert ok["fine_tune"]["lr"] == 0.01 and params["fine_tune"]["lr"] != 0.01  # a copy
    with pytest.raises(ParamsError, match="fine_tune.lr: expected a number"):
        apply_overrides(params, ["fine_tune.lr=fast"])
    with pytest.raises(ParamsError, match="preprocess.val_fraction"):
        apply_overrides(params, ["preprocess.val_fraction=2"])
    with pytest.raises(ParamsError, match="fine_tune.mode: 'frozen' is not one of"):
        apply_overrides(params, ["fine_tune.mode=frozen"])


def test_write_overrides_keeps_comments(tmp_path, committed_params):
    import shutil

    from graft.overrides import write_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(committed_params, path)
    original = path.read_text()
    write_overrides(path, ["fine_tune.epochs=3", "ingest.max_test_per_class=50"])
    text = path.read_text()
    assert "# upper bound; early stopping may end sooner" in text
    changed = [(a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b]
    assert len(changed) == 2, changed  # only the overridden lines differ; `null`s stay `null`
    write_overrides(path, ["ingest.classes=[a, b]"])
    params = read_params(path)
    assert params["fine_tune"]["epochs"] == 3 and params["ingest"]["classes"] == ["a", "b"]
    before = path.read_text()
    with pytest.raises(ParamsError):
        write_overrides(path, ["fine_tune.epochs=many"])
    assert path.read_text() == before  # a rejected override changes nothing


def test_exponent_without_dot_is_a_number():
    # PyYAML reads `lr: 1e-4` as the string '1e-4'; the key is a float, so it means 0.0001.
    d = parse(Demo, {"size": 1, "rate": "1e-4", "mode": "a"}, "demo")
    assert d.rate == 1e-4
    with pytest.raises(ParamsError, match="demo.rate: expected a number"):
        parse(Demo, {"size": 1, "rate": "fast", "mode": "a"}, "demo")


def test_every_field_of_a_stage_can_be_set_even_when_the_file_omits_it(tmp_path, committed_params):
    """A field with a default (`fine_tune.eval_batch_size`) left out of a user's
    params.yaml: the stage accepts it, so --set must too (one source of truth: the
    stage's type)."""
    from graft.overrides import apply_overrides, write_overrides

    path = tmp_path / "params.yaml"
    lines = committed_params.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.strip().startswith("eval_batch_size:")))
    params = read_params(path)
    assert "eval_batch_size" not in params["fine_tune"]
    assert apply_overrides(params, ["fine_tune.eval_batch_size=128"])["fine_tune"]["eval_batch_size"] == 128
    with pytest.raises(ParamsError, match="unknown key 'fine_tune.eval_batchsize'.*eval_batch_size"):
        apply_overrides(params, ["fine_tune.eval_batchsize=128"])
    write_overrides(path, ["fine_tune.lr=1e6", "fine_tune.eval_batch_size=128"])
    written = read_params(path)["fine_tune"]
    assert written["lr"] == 1e6 and isinstance(written["lr"], float)  # a number, not the string '1e6'
    assert written["eval_batch_size"] == 128


def test_presets_switch_modality_and_back_to_the_committed_params(tmp_path, committed_params):
    """`--preset text` then `--preset image` gives params.yaml back as committed: both
    presets name the same keys, and the image preset is the committed file's values."""
    import yaml

    from graft.config.params import preset_overrides
    from graft.overrides import apply_overrides
    from tests.conftest import ROOT

    presets = {n: yaml.safe_load((ROOT / "presets" / f"{n}.yaml").read_text()) for n in ("image", "text")}
    keys = {n: {(s, k) for s, ks in p.items() for k in ks} for n, p in presets.items()}
    assert keys["image"] == keys["text"]
    committed = read_params(committed_params)
    for section, k in keys["image"]:
        assert committed[section][k] == presets["image"][section][k], f"{section}.{k}"
    as_text = apply_overrides(committed, preset_overrides("text", ROOT))
    assert as_text["ingest"]["source"] == "texttable" and as_text["ingest"]["drop_classes"] == ["plot"]
    assert apply_overrides(as_text, preset_overrides("image", ROOT)) == apply_overrides(committed, [])
    with pytest.raises(ParamsError, match="no preset 'speech'.*known presets: full, image, text"):
        preset_overrides("speech", ROOT)
    # The full-data profile changes keys the image preset restores: --preset image undoes it.
    full = yaml.safe_load((ROOT / "presets" / "full.yaml").read_text())
    assert {(s, k) for s, ks in full.items() for k in ks} <= keys["image"]
    as_full = apply_overrides(committed, preset_overrides("full", ROOT))
    assert as_full["ingest"]["max_train_per_class"] is None and as_full["fine_tune"]["tta"] == "hflip"
    assert apply_overrides(as_full, preset_overrides("image", ROOT)) == apply_overrides(committed, [])
    # A backbone of the other modality is refused before anything runs, with the way out.
    with pytest.raises(ParamsError, match="known packaged text encoders.*--preset text"):
        apply_overrides(committed, ["ingest.source=texttable"])


def test_a_negative_min_improvement_is_refused_with_the_allowed_range():
    """The gate requires a gain over the champion; a negative register.min_improvement
    was accepted and then ignored."""
    from graft.config.params import RegisterParams

    ok = parse(RegisterParams, {"model_name": "m", "min_accuracy": 0.8, "min_improvement": 0.0}, "register")
    assert ok.gate.min_improvement == 0.0
    with pytest.raises(ParamsError, match=r"register.min_improvement has an invalid value: -0.01 \(allowed: 0 or more\)"):
        parse(RegisterParams, {"model_name": "m", "min_accuracy": 0.8, "min_improvement": -0.01}, "register")


def test_nested_graft_yaml_keys_and_unions_are_named(tmp_path):
    from graft.config import project

    (tmp_path / "graft.yaml").write_text("servers:\n  prefect:\n    portt: 4300\n")
    with pytest.raises(ParamsError, match=r"unknown key\(s\) servers.prefect.portt; known keys of 'servers.prefect': port, host"):
        project.load(tmp_path)
    (tmp_path / "graft.yaml").write_text("compute:\n  threads: 2.5\n")
    with pytest.raises(ParamsError, match=r"compute.threads: expected .*an integer.* got 2.5"):
        project.load(tmp_path)
