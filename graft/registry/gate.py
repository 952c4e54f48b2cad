"""The promotion gate, once: a candidate and the champion score the same raw test samples
in this process, each through its own serving code, and :func:`graft.registry.rules.decide`
turns the pair into a decision.

``register`` (the pipeline), ``graft promote`` and ``graft diff`` all come through here, so
the three cannot disagree about what "beats the champion" means: a champion that knows
other classes is never scored against this data, whichever command asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graft.data.samples import RawSamples
from graft.registry import rules
from graft.registry.rules import GateParams


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


def serving_costs(candidate, champion, samples: RawSamples) -> tuple[dict[str, float], dict[str, float] | None]:
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

    def decision(self, gate: GateParams, candidate_version: str | None = None) -> rules.Decision:
        return rules.decide(self.pair.candidate_correct, self.pair.champion_correct, self.champion_version, gate,
                            self.pair.incompatible, candidate_version=candidate_version, serving=self.serving)  # fmt: skip


def compare(candidate, champion, samples: RawSamples, gate: GateParams, champion_version: str | None,
            measure_serving: bool = True) -> Comparison:  # fmt: skip
    """Score ``candidate`` and ``champion`` (None: no champion yet) on ``samples``, the
    class lists checked first; measure serving costs side by side when asked, and always
    when the gate has a latency limit."""
    pair = score_pair(candidate, champion, samples, f"champion v{champion_version}")
    compared = champion if pair.champion_correct is not None else None
    costs = (serving_costs(candidate, compared, samples)
             if measure_serving or gate.max_latency_ms is not None else (None, None))  # fmt: skip
    return Comparison(pair, champion_version, costs)
