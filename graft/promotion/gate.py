"""The promotion gate, once: a candidate and the champion score the same raw test samples
in this process, each through its own serving code, and :func:`decide` turns the pair into
a decision (McNemar's test on the pairs, the thresholds of ``register`` in params.yaml).

``register`` (the pipeline), ``graft promote`` and ``graft diff`` all come through here, so
the three cannot disagree about what "beats the champion" means: a champion that knows
other classes is never scored against this data, whichever command asks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graft.config.params import GateParams
from graft.data.samples import RawSamples

# --- the decision (pure) -------------------------------------------------------------------


def mcnemar(candidate_correct: np.ndarray, champion_correct: np.ndarray) -> dict[str, float]:
    """Exact two-sided McNemar test on paired per-sample correctness.

    ``b``: samples the candidate gets right and the champion wrong; ``c``: the reverse.
    Under "equally good", b ~ Binomial(b + c, 1/2)."""
    from scipy.stats import binomtest  # SciPy: ~1 s of import, paid where a test statistic is computed

    b = int(np.sum(candidate_correct & ~champion_correct))
    c = int(np.sum(~candidate_correct & champion_correct))
    p_value = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"b": b, "c": c, "p_value": float(p_value)}




@dataclass
class Decision:
    promote: bool
    reason: str
    candidate_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    mcnemar: dict[str, float] | None
    n: int
    replaces_challenger: str | None = None  # the challenger this candidate displaces, if any
    # serving cost measured side by side in the deciding process (graft.models.serving.serving_cost)
    candidate_serving: dict[str, float] | None = None
    champion_serving: dict[str, float] | None = None
    # A candidate that is the very model an existing version serves: that version, and the
    # alias it holds (None: none). Nothing was registered; the run is linked to it.
    same_as: str | None = None
    same_as_alias: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(candidate_correct: np.ndarray, champion_correct: np.ndarray | None, champion_version: str | None,
           gate: GateParams, incompatible: str | None = None, candidate_version: str | None = None,
           serving: tuple[dict[str, float] | None, dict[str, float] | None] = (None, None)) -> Decision:  # fmt: skip
    """Champion or not, and why. Both scores and the paired test are always reported when
    there is a champion. ``incompatible`` names why the champion could not be scored on
    this data (another class list, say); the candidate is then not promoted automatically.
    ``serving``: the candidate's and the champion's serving cost, measured side by side;
    with ``gate.max_latency_ms`` set, a candidate slower than that at batch 1 stays out."""
    n = int(len(candidate_correct))
    acc = float(candidate_correct.mean()) if n else 0.0
    champ = float(champion_correct.mean()) if champion_correct is not None else None
    test = mcnemar(candidate_correct, champion_correct) if champion_correct is not None else None

    def result(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, acc, champion_version, champ, test, n, None, *serving)

    if incompatible:
        return result(False, f"the champion cannot be compared on this data ({incompatible}); "
                             f"promote explicitly with `graft promote {candidate_version or 'VERSION'} --force`")  # fmt: skip
    if acc < gate.min_accuracy:
        return result(False, f"test accuracy {acc:.4f} is below register.min_accuracy {gate.min_accuracy}")
    if gate.max_latency_ms is not None:
        if serving[0] is None:
            raise ValueError("register.max_latency_ms is set: the candidate's latency must be measured")
        latency = serving[0]["latency_ms_b1"]
        if latency > gate.max_latency_ms:
            beside = f" (champion v{champion_version}: {serving[1]['latency_ms_b1']:.2f} ms)" if serving[1] else ""
            return result(False, f"latency {latency:.2f} ms per sample at batch 1 exceeds register.max_latency_ms "
                                 f"{gate.max_latency_ms:g}{beside}")  # fmt: skip
    if champ is None or test is None:
        return result(True, f"first champion: test accuracy {acc:.4f} >= register.min_accuracy {gate.min_accuracy}")
    gain = acc - champ
    if gain <= 0 or gain < gate.min_improvement:
        return result(False, f"accuracy {acc:.4f} does not beat the champion's {champ:.4f} "
                             f"by register.min_improvement {gate.min_improvement} (gain {gain:+.4f})")  # fmt: skip
    if gate.require_significance and test["p_value"] >= gate.alpha:
        return result(False, f"gain {gain:+.4f} is not significant (McNemar p = {test['p_value']:.3g} >= alpha {gate.alpha})")
    return result(True, f"accuracy {acc:.4f} beats the champion's {champ:.4f} by {gain:+.4f} (McNemar p = {test['p_value']:.3g})")



# --- scoring both models on the same samples ----------------------------------------------


def load_test_samples(raw_dir: Path, prepared_dir: Path) -> RawSamples:
    return RawSamples(raw_dir, prepared_dir, "test")


def classes_of(model) -> list[str]:
    """The class list of a registered pyfunc or of a folder loaded for scoring."""
    unwrap = getattr(model, "unwrap_python_model", None)
    wrapper = unwrap() if unwrap else getattr(model, "wrapper", model)
    return list(wrapper.cfg.classes)


def score(pyfunc_model, samples: RawSamples, batch: int = 256) -> np.ndarray:
    """Per-sample correctness of a pyfunc model on the raw test samples, in the prepared
    order (so two models' results pair up for McNemar's test)."""
    truth = np.asarray(samples.truth)
    correct = np.zeros(len(samples), dtype=bool)
    for positions, frame in samples.batches(batch):
        correct[positions] = pyfunc_model.predict(frame)["class"].to_numpy() == truth[positions]
    return correct


def serving_costs(candidate, champion, samples: RawSamples) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """Both pyfuncs' serving cost, measured one after the other in this process on the
    same test samples: a fair side-by-side, whatever machine the gate runs on."""
    from graft.models import serving  # mlflow.pyfunc: 1.5 to 2 s of import, only when costs are measured

    frame = samples.head(serving.THROUGHPUT_BATCH)
    measure = [serving.serving_cost(m.predict, frame) if m is not None else None for m in (candidate, champion)]
    return measure[0], measure[1]


@dataclass
class Pair:
    """Two models scored on the same samples; ``champion_correct`` is None when there is no
    champion or it cannot be compared (``incompatible`` says why)."""

    candidate_correct: np.ndarray
    champion_correct: np.ndarray | None
    incompatible: str | None


def score_pair(candidate, champion, samples: RawSamples, champion_label: str = "the champion") -> Pair:
    """Score both models on ``samples``, after checking they know the same classes."""
    candidate_correct = score(candidate, samples)
    if champion is None:
        return Pair(candidate_correct, None, None)
    theirs, ours = classes_of(champion), classes_of(candidate)
    if sorted(theirs) != sorted(ours):
        return Pair(candidate_correct, None, f"{champion_label} knows classes {theirs}, this model has {ours}")
    return Pair(candidate_correct, score(champion, samples), None)


@dataclass
class Comparison:
    """What the gate measured: both models' scores on the same samples and, when asked,
    their serving costs side by side. :meth:`decision` applies the thresholds."""

    pair: Pair
    champion_version: str | None
    serving: tuple[dict[str, float] | None, dict[str, float] | None]

    def decision(self, gate: GateParams, candidate_version: str | None = None) -> Decision:
        return decide(self.pair.candidate_correct, self.pair.champion_correct, self.champion_version, gate,
                            self.pair.incompatible, candidate_version=candidate_version, serving=self.serving)  # fmt: skip


def compare(candidate, champion, samples: RawSamples, gate: GateParams, champion_version: str | None,
            serving: tuple[dict[str, float] | None, dict[str, float] | None] | None = None) -> Comparison:  # fmt: skip
    """Score ``candidate`` and ``champion`` (None: no champion yet) on ``samples``, the
    class lists checked first. ``serving``: the two versions' serving costs as ``evaluate``
    measured them (one figure per version, measured once); where the gate has a latency
    limit and the candidate's was not recorded, both are measured here side by side."""
    pair = score_pair(candidate, champion, samples, f"champion v{champion_version}")
    compared = champion if pair.champion_correct is not None else None
    costs = serving or (None, None)
    if costs[0] is None and gate.max_latency_ms is not None:
        costs = serving_costs(candidate, compared, samples)
    return Comparison(pair, champion_version, costs)
