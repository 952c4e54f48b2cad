"""The benchmarks page's figures (docs/explanation/benchmarks.md) come from benchmarks/results-cpu.json, which only the
benchmark writes: the table must be that file's rendering, and the file must hold what
the benchmark measures (its machine fields included) and agree with its own raw runs."""

import copy
import importlib.util
import json
import re
import sys

import pytest

from tests.conftest import ROOT

RESULTS = ROOT / "benchmarks" / "results-cpu.json"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


def test_the_table_is_the_rendering_of_the_results_file(results):
    report = load("report")
    assert report.current_block(report.PAGE.read_text()) == report.render(results), (
        "the benchmarks page's benchmark table differs from benchmarks/results-cpu.json: run python benchmarks/report.py"
    )


def test_results_describe_the_machine_they_were_measured_on(results):
    m = results["machine"]
    for key in ("cpu", "platform", "torch", "timm", "python", "graft_commit"):
        assert isinstance(m[key], str) and m[key], key
    assert m["usable_cores"] >= 1 and m["torch_threads"] >= 1 and m["logical_cores"] >= m["usable_cores"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", m["date"])
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", m["graft_commit"])


def test_throughput_figures_agree_with_their_own_rounds(results):
    transfer = load("transfer")
    t = results["throughput"]
    assert len(t["graft_runs"]) == len(t["plain_runs"]) == t["rounds"] and t["rounds"] % 2 == 0
    again = transfer.throughput_figures(t["graft_runs"], t["plain_runs"])
    for key in ("graft_images_per_second", "plain_loop_images_per_second", "ratio", "spread", "parity"):
        assert again[key] == pytest.approx(t[key]), key


def test_parity_is_claimed_only_within_the_spread():
    transfer = load("transfer")
    level = transfer.throughput_figures([100, 101, 99, 100], [99, 100, 101, 100])
    assert level["parity"] and level["spread"] == pytest.approx(0.02)
    faster = transfer.throughput_figures([110, 111, 109, 110], [99, 100, 101, 100])
    assert not faster["parity"] and faster["ratio"] == pytest.approx(1.10)


def test_the_table_says_parity_faster_or_slower_from_the_figures(results):
    report = load("report")
    t = copy.deepcopy(results)
    t["throughput"].update(ratio=1.10, spread=0.02, parity=False)
    assert "1.10: faster (round-to-round spread 2.0%" in report.render(t)
    t["throughput"].update(ratio=1.01, spread=0.02, parity=True)
    assert "1.01: parity" in report.render(t)


def test_the_scratch_baseline_is_the_sweep_run_with_the_best_validation_accuracy(results):
    s = results["scratch"]
    best = max(s["sweep"], key=lambda r: r["val_accuracy"])
    assert s["lr"] == best["lr"] and s["test_accuracy"] == best["test_accuracy"]
    assert s["mode"] == "full" and s["lr_decay"] == 1.0 and len(s["sweep"]) >= 3


def test_feature_cache_ratios_are_their_measured_times(results):
    f = results["feature_extraction"]
    assert f["epoch_speedup"] == pytest.approx(f["recompute_epoch_seconds"] / f["cached_epoch_seconds"])
    assert f["end_to_end_speedup"] == pytest.approx(f["recompute_end_to_end_seconds"] / f["end_to_end_seconds"])
    assert f["cache_seconds"] < f["end_to_end_seconds"]  # the cache build is part of the run's time


TEXT_RESULTS = ROOT / "benchmarks" / "results-text-cpu.json"


@pytest.fixture(scope="module")
def text_results():
    return json.loads(TEXT_RESULTS.read_text())


def test_the_text_table_is_the_rendering_of_the_text_results(text_results):
    report = load("report")
    block = report.current_block(report.PAGE.read_text(), report.TEXT_BEGIN, report.TEXT_END)
    assert block == report.render_text(text_results), (
        "the benchmarks page's text benchmark table differs from benchmarks/results-text-cpu.json: run python benchmarks/report.py"
    )


def test_text_baseline_is_the_c_with_the_best_validation_accuracy_and_models_share_one_split(text_results):
    b = text_results["tfidf"]
    assert b["C"] == max(b["sweep"], key=lambda r: r["val_accuracy"])["C"] and len(b["sweep"]) >= 3
    runs = [text_results[k] for k in ("fine_tuned", "feature_extraction", "scratch")]
    assert len({(r["train_texts"], r["test_texts"]) for r in runs}) == 1
    assert [r["mode"] for r in runs] == ["full", "feature_extraction", "full"]
    m = text_results["machine"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", m["graft_commit"]) and m["torch_threads"] >= 1


def test_the_text_table_computes_gains_from_the_figures(text_results):
    report = load("report")
    t = copy.deepcopy(text_results)
    t["tfidf"]["test_accuracy"], t["fine_tuned"]["test_accuracy"] = 0.70, 0.80
    assert "| +10.0 points |" in report.render_text(t)


def test_memory_ratios_are_their_measured_peaks(results):
    m = results["memory"]
    small, large = m["sizes"]["N"], m["sizes"]["4N"]
    assert large["images"] >= 3.5 * small["images"]  # 4N: Fashion-MNIST's test split caps it a little under
    extra = large["images"] - small["images"]
    for stage, ratio in m["ratios"].items():
        a, b = small["stages"][stage], large["stages"][stage]
        assert ratio == pytest.approx(b["peak_rss_mb"] / a["peak_rss_mb"]), stage
        assert m["kb_per_extra_sample"][stage] == pytest.approx((b["peak_anon_mb"] - a["peak_anon_mb"]) * 1024 / extra)
    lim = m["limited"]
    if "skipped" not in lim:
        assert lim["limit_over_data"] == pytest.approx(lim["limit_mb"] / lim["prepared_mb"])


def test_the_memory_table_is_the_rendering_of_the_results_file(results):
    report = load("report")
    block = report.current_block(report.PAGE.read_text(), report.MEMORY_BEGIN, report.MEMORY_END)
    assert block == report.render_memory(results), (
        "the benchmarks page's memory table differs from benchmarks/results-cpu.json: run python benchmarks/report.py"
    )


def test_the_distillation_figures_are_consistent(results):
    """The distillation benchmark's derived figures follow from its measurements."""
    d = results["distill"]
    alone, taught, soft = d["student_alone"], d["student_distilled"], d["teacher_soft_labels"]
    assert d["gain_points"] == pytest.approx(100 * (taught["accuracy"] - alone["accuracy"]))
    # the headline student is the one with the best validation accuracy, never chosen on test
    assert taught["best_val_accuracy"] == max(r["best_val_accuracy"] for r in d["distilled_runs"])
    assert taught in d["distilled_runs"]
    assert alone["architecture"] == taught["architecture"] and alone["image_size"] == taught["image_size"]
    assert soft["on_the_fly_extra_seconds"] == pytest.approx(soft["seconds"] * taught["epochs_run"])
    for f in (d["teacher"], alone, taught):
        assert 0 < f["accuracy"] <= 1 and f["latency_ms_b1"] > 0 and f["size_mb"] > 0


def test_the_distillation_table_is_the_rendering_of_the_results_file(results):
    report = load("report")
    block = report.current_block(report.PAGE.read_text(), report.DISTILL_BEGIN, report.DISTILL_END)
    assert block == report.render_distill(results), (
        "the benchmarks page's distillation table differs from benchmarks/results-cpu.json: run python benchmarks/report.py"
    )


def test_the_drift_figures_are_consistent(results):
    """The drift benchmark's counts and sums follow from its own runs."""
    d = results["drift"]
    fa, cost = d["false_alarms"], d["cost"]
    assert fa["runs"] == len(fa["runs_detail"]) == d["settings"]["seeds"]
    assert fa["alarms"] == sum(r["verdict"] == "drift" for r in fa["runs_detail"])
    alpha = d["settings"]["alpha"]
    for r in [*fa["runs_detail"], *d["power"].values()]:
        assert (r["verdict"] == "drift") == (r["p_adjusted_min"] < alpha)
        assert r["p_adjusted_min"] >= 1 / (d["settings"]["permutations"] + 1) and 0 <= r["domain_auc"] <= 1
    assert cost["total_seconds"] == pytest.approx(cost["embed_seconds"] + cost["test_seconds"] + cost["plot_seconds"])
    assert cost["images_per_second"] == pytest.approx(cost["samples"] / cost["embed_seconds"])


def test_the_drift_table_is_the_rendering_of_the_results_file(results):
    report = load("report")
    block = report.current_block(report.PAGE.read_text(), report.DRIFT_BEGIN, report.DRIFT_END)
    assert block == report.render_drift(results), (
        "the benchmarks page's drift table differs from benchmarks/results-cpu.json: run python benchmarks/report.py"
    )


def test_the_accuracy_figures_are_consistent(results):
    """Each variant's shipped accuracy is the one of its own TTA setting, its curve runs in
    time order to its total minutes, and its best epoch is the curve's best validation."""
    for preset, a in results["accuracy_per_minute"].items():
        for name, v in a["variants"].items():
            tta = {**a["recipe"], **v["overrides"]}["tta"]
            assert v["test_accuracy"] == v["test_accuracy_hflip_tta" if tta == "hflip" else "test_accuracy_no_tta"], name
            minutes = [p["minutes"] for p in v["curve"]]
            assert minutes == sorted(minutes) and minutes[-1] <= v["fine_tune_minutes"] and len(minutes) == v["epochs_run"]
            assert max(p["val_accuracy"] for p in v["curve"]) == pytest.approx(v["best_val_accuracy"]), name


@pytest.mark.parametrize("block", ["ACCURACY", "MACHINE", "STARTUP"])
def test_the_accuracy_machine_use_and_startup_tables_are_the_rendering_of_the_results_file(results, block):
    report = load("report")
    current = report.current_block(report.PAGE.read_text(), getattr(report, f"{block}_BEGIN"),
                                   getattr(report, f"{block}_END"))  # fmt: skip
    render = {"ACCURACY": report.render_accuracy, "MACHINE": report.render_machine_use,
              "STARTUP": report.render_startup}[block]  # fmt: skip
    assert current == render(results), f"the benchmarks page's {block.lower()} table is stale: run python benchmarks/report.py"
