"""Moving the champion by hand (``graft promote``, ``graft rollback``): the same gate as
the pipeline's register stage, unless forced, and the same alias history."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from graft.base.errors import GraftError
from graft.config import paths
from graft.config.params import RegisterParams, load_section
from graft.promotion import gate
from graft.registry import rules as registry


def promote(client, name: str, version: str, root: Path, reason: str = "", force: bool = False,
            say: Callable[[str], None] = print) -> str:  # fmt: skip
    """Make ``version`` champion, after the gate (scored beside the champion on the
    workspace's test samples) unless ``force``; the line that says what happened. A
    refusal is a GraftError that says why and that nothing changed."""
    try:
        client.get_model_version(name, version)
    except Exception:
        raise GraftError(f"'{name}' has no version {version}; `graft status` lists them") from None
    champion = registry.alias_version(client, name, registry.CHAMPION)
    if champion is not None and str(champion.version) == str(version):
        raise GraftError(f"v{version} is already the champion")
    if force:
        why = reason or "promoted by hand (--force, no gate)"
    else:
        raw, prepared = root / paths.RAW, root / paths.PREPARED
        if not (prepared / "test_ids.npy").is_file():
            raise GraftError("no test data in this workspace to compare on; run `graft run` first, or pass --force")
        params = load_section(RegisterParams, "register", root / paths.PARAMS)
        samples = gate.load_test_samples(raw, prepared)
        say(f"Scoring v{version}" + (f" and champion v{champion.version}" if champion else "") + f" on {len(samples)} test samples...")
        from graft.models import serving  # mlflow.pyfunc: 1.5 to 2 s of import, only when a model is loaded

        cand_model = serving.load_registered(f"models:/{name}/{version}")
        champ_model = serving.load_registered(f"models:/{name}/{champion.version}") if champion else None
        costs = (registry.recorded_serving(client, client.get_model_version(name, str(version))),
                 registry.recorded_serving(client, champion))  # as evaluate measured them
        comparison = gate.compare(cand_model, champ_model, samples, params.gate,
                                  str(champion.version) if champion else None, costs)  # fmt: skip
        decision = comparison.decision(params.gate, candidate_version=version)
        say(f"  {decision.reason}")
        if not decision.promote:
            raise GraftError(f"v{version} did not pass the gate; not promoted (use --force to override)")
        why = f"{reason + ': ' if reason else ''}promoted by hand: {decision.reason}"
    registry.move_alias(client, name, registry.CHAMPION, version, why)
    challenger = registry.alias_version(client, name, registry.CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        registry.remove_alias(client, name, registry.CHALLENGER, f"v{version} promoted to champion")
    return f"{name} v{version} is now champion" + (f" (was v{champion.version})" if champion else "")


def rollback(client, name: str, reason: str = "rollback") -> str:
    """Move the champion back to the version that held it before; the line that says so."""
    current = registry.alias_version(client, name, registry.CHAMPION)
    if current is None:
        raise GraftError(f"'{name}' has no champion to roll back")
    stack = registry.champion_stack(registry.history(client, name))
    if not stack or stack[-1] != str(current.version):
        raise GraftError(f"the champion v{current.version} was not set through graft (its alias history ends at "
                         f"{'v' + stack[-1] if stack else 'nothing'}); move it with `graft promote VERSION --force`")  # fmt: skip
    if len(stack) < 2:
        raise GraftError(f"v{current.version} is the first champion of '{name}' still in force: there is nothing "
                         "earlier to roll back to")  # fmt: skip
    previous = stack[-2]
    registry.move_alias(client, name, registry.CHAMPION, previous, f"{reason} (from v{current.version})", kind="rollback")
    return f"{name}: champion rolled back from v{current.version} to v{previous}"
