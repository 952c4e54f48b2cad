"""The promotion gate's rules and McNemar's test, on hand-made correctness vectors."""

import math

import numpy as np
import pytest

from graft.config.params import GateParams
from graft.promotion.gate import decide, mcnemar

GATE = GateParams(min_accuracy=0.5, min_improvement=0.01, require_significance=False, alpha=0.05)


def vec(*bits):
    return np.array(bits, dtype=bool)


def test_mcnemar_by_hand():
    cand = vec(1, 1, 1, 1, 0, 1, 1, 1)
    champ = vec(0, 0, 0, 1, 1, 1, 1, 1)
    # b = 3 (candidate only), c = 1 (champion only); p = 2 * P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5/16
    t = mcnemar(cand, champ)
    assert (t["b"], t["c"]) == (3, 1) and t["p_value"] == pytest.approx(10 / 16)
    assert mcnemar(cand, cand)["p_value"] == 1.0


def test_mcnemar_large_counts_stay_finite():
    rng = np.random.default_rng(0)
    a = rng.random(20000) < 0.9
    b = rng.random(20000) < 0.85
    p = mcnemar(a, b)["p_value"]
    assert 0.0 <= p < 1e-6 and math.isfinite(p)


def test_first_model_needs_the_threshold():
    assert decide(vec(1, 1, 0, 1), None, None, GATE).promote
    low = decide(vec(1, 0, 0, 0), None, None, GATE)
    assert not low.promote and "below register.min_accuracy" in low.reason


def test_must_beat_the_champion_on_the_same_data():
    champ = vec(1, 1, 1, 0, 0, 1, 1, 1, 0, 1)
    better = vec(1, 1, 1, 1, 1, 1, 1, 1, 0, 1)
    d = decide(better, champ, "1", GATE)
    assert d.promote and d.champion_accuracy == 0.7 and d.candidate_accuracy == 0.9 and d.mcnemar["b"] == 2
    same = decide(champ, champ, "1", GATE)
    assert not same.promote and "does not beat" in same.reason and same.champion_accuracy == 0.7


def test_significance_can_be_required():
    champ = vec(1, 1, 1, 0, 0, 1, 1, 1, 0, 1)
    better = vec(1, 1, 1, 1, 1, 1, 1, 1, 0, 1)
    strict = GateParams(0.5, 0.0, require_significance=True, alpha=0.05)
    d = decide(better, champ, "1", strict)
    assert not d.promote and "not significant" in d.reason  # 2 discordant pairs: p = 0.5


def test_incompatible_champion_is_not_replaced_silently():
    d = decide(vec(1, 1), None, "4", GATE, incompatible="other classes")
    assert not d.promote and "--force" in d.reason


def test_messages_name_the_real_version():
    d = decide(vec(1, 1), None, "4", GATE, incompatible="other classes", candidate_version="7")
    assert "graft promote 7 --force" in d.reason and "VERSION" not in d.reason


def test_challenger_decision_does_not_offer_the_champion_alias():
    from graft.promotion.register import format_decision

    lose = decide(vec(0, 1, 0, 0), vec(1, 1, 1, 1), "1", GATE, candidate_version="2")
    text = format_decision(lose, "m", "2")
    assert "@champion" not in text and "models:/m/2" in text and "champion stays v1" in text
    win = decide(vec(1, 1, 1, 1), None, None, GATE, candidate_version="1")
    assert "models:/m@champion" in format_decision(win, "m", "1")


def test_a_latency_limit_keeps_a_slow_candidate_out_whatever_its_accuracy():
    from dataclasses import replace

    limited = replace(GATE, max_latency_ms=5.0)
    fast, slow, champ_cost = {"latency_ms_b1": 3.0}, {"latency_ms_b1": 7.5}, {"latency_ms_b1": 4.0}
    better, champ = vec(1, 1, 1, 1), vec(1, 0, 0, 1)
    d = decide(better, champ, "1", limited, serving=(slow, champ_cost))
    assert not d.promote and "latency 7.50 ms" in d.reason and "register.max_latency_ms 5" in d.reason
    assert "champion v1: 4.00 ms" in d.reason
    assert d.candidate_serving == slow and d.champion_serving == champ_cost  # side by side in the decision
    assert decide(better, champ, "1", limited, serving=(fast, champ_cost)).promote
    assert not decide(better, None, None, limited, serving=(slow, None)).promote  # a first champion too
    # No limit: latency is reported, never decisive.
    assert decide(better, champ, "1", GATE, serving=(slow, champ_cost)).promote
    with pytest.raises(ValueError, match="latency must be measured"):
        decide(better, champ, "1", limited)
