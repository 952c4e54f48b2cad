"""Freezing per transfer mode, discriminative LRs, gradual unfreezing, determinism and
crash-resume of the training core, on a few tiny synthetic images."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from graft.base import threads
from graft.base.arrays import NpyReader
from graft.base.errors import GraftError
from graft.config import params
from graft.config.params import LoadPretrainedParams
from graft.modalities.backbone import build
from graft.models import modeling
from graft.training.fine_tune import (
    FineTuneParams,
    Split,
    _evaluate,
    _features,
    freeze_batchnorm_stats,
    layer_groups,
    optimizer_groups,
    set_trainable,
    train,
    trainable_groups,
)

ARCH = "tf_efficientnet_lite0"
SIZE = 32
BASE = FineTuneParams(mode="partial", epochs=3, batch_size=8, lr=0.01, weight_decay=0.01, warmup_epochs=0.5,
                      label_smoothing=0.1, patience=5, seed=0, frozen_groups=3, crop_padding=2,
                      eval_batch_size=16)  # fmt: skip


def make_model(seed=0):
    model = build(LoadPretrainedParams(ARCH, "packaged:efficientnet_lite0"), num_classes=2, seed=seed).model
    cfg = modeling.ModelConfig(ARCH, ["a", "b"], 0.2, "packaged:efficientnet_lite0", None,
                               {"image_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                "resize": "squash"})  # fmt: skip
    return model, cfg


@pytest.fixture(scope="module")
def data():
    """Two separable classes: dark squares vs bright squares, with noise."""
    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % 2
        x = (rng.integers(0, 80, (n, SIZE, SIZE, 3)) + 150 * y[:, None, None, None]).astype(np.uint8)
        return Split(x, y.astype(np.int64))

    return split(24), split(8)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_modes_freeze_exactly_the_right_groups():
    model, _ = make_model()
    groups = layer_groups(model)
    names = [[n for n, _ in g] for g in groups]
    assert names[0] == ["conv_stem.weight", "bn1.weight", "bn1.bias"]  # stem first
    assert names[-1] == ["classifier.weight", "classifier.bias"]  # head last
    n = len(groups)

    set_trainable(groups, trainable_groups(n, "feature_extraction", 0))
    assert trainable_names(model) == {"classifier.weight", "classifier.bias"}

    set_trainable(groups, trainable_groups(n, "partial", 3))
    assert trainable_names(model) == {x for g in names[3:] for x in g}
    assert not any(name.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.")) for name in trainable_names(model))

    set_trainable(groups, trainable_groups(n, "full", 0))
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}

    with pytest.raises(GraftError, match="frozen_groups"):
        trainable_groups(n, "partial", n - 1)


def test_frozen_batchnorm_keeps_running_stats():
    model, _ = make_model()
    groups = layer_groups(model)
    set_trainable(groups, trainable_groups(len(groups), "partial", 2))
    model.train()
    freeze_batchnorm_stats(model)
    assert model.bn1.training is False  # stem: frozen
    assert model.blocks[0][0].bn1.training is False  # group 1: frozen
    assert model.blocks[5][0].bn1.training is True  # trains
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, SIZE, SIZE))
    assert torch.equal(model.bn1.running_mean, before)


def test_discriminative_learning_rates():
    model, _ = make_model()
    groups = layer_groups(model)
    active = trainable_groups(len(groups), "full", 0)
    p = replace(BASE, lr=1.0, lr_decay=0.5)
    lrs = {g["name"].rsplit("_", 1)[0]: g["lr"] for g in optimizer_groups(groups, active, p)}
    head = len(groups) - 1
    assert lrs[f"group{head}"] == 1.0 and lrs[f"group{head - 1}"] == 0.5 and lrs["group0"] == 0.5**head


def test_feature_extraction_changes_only_the_head_and_cache_matches_model(data, tmp_path):
    train_split, val_split = data
    model, cfg = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = replace(BASE, mode="feature_extraction", epochs=2, channels_last=False)
    (tmp_path / "ck" / ".graft-features-stale").mkdir(parents=True)  # as a killed run leaves it
    train(model, cfg, train_split, val_split, p, checkpoint=tmp_path / "ck" / "fine_tune.pt")
    # The cache lived beside the checkpoint and went with the training, a stale one too.
    assert sorted(p_.name for p_ in (tmp_path / "ck").iterdir()) == ["fine_tune.pt"]
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}  # BN statistics untouched too
    feats = _features(model, val_split.x, cfg, torch.device("cpu"), p, "test", tmp_path / "val.npy")
    assert np.load(tmp_path / "val.npy").shape == (len(val_split.y), feats.shape[1])  # on disk, one row a sample
    via_cache = _evaluate(model, val_split, cfg, torch.device("cpu"), p, feats)
    via_model = _evaluate(model, val_split, cfg, torch.device("cpu"), p)
    assert via_cache[2] == via_model[2]  # accuracy
    assert via_cache[:2] == pytest.approx(via_model[:2], rel=1e-4)  # smoothed loss and NLL


def test_gradual_unfreezing_trains_head_first(data):
    train_split, val_split = data
    model, cfg = make_model()
    stem = model.conv_stem.weight.clone()
    seen = []
    p = replace(BASE, mode="full", epochs=2, head_epochs=1)
    train(model, cfg, train_split, val_split, p,
          on_epoch=lambda r: seen.append((r["trainable_parameters"], model.conv_stem.weight.clone())))
    assert seen[0][0] < seen[1][0]  # more parameters train in epoch 2
    assert torch.equal(seen[0][1], stem) and not torch.equal(seen[1][1], stem)


def test_same_seed_same_weights_and_learns(data):
    train_split, val_split = data
    results = []
    for _ in range(2):
        model, cfg = make_model()
        r = train(model, cfg, train_split, val_split, BASE)
        results.append((model.state_dict(), r))
    (a, ra), (b, rb) = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]
    assert ra.best_val_accuracy >= 0.75  # bright vs dark is learnable in three epochs


class Crash(Exception):
    pass


def test_resume_after_crash_gives_the_same_weights(tmp_path, data):
    train_split, val_split = data
    p = replace(BASE, epochs=3)
    model, cfg = make_model()
    train(model, cfg, train_split, val_split, p)
    uninterrupted = model.state_dict()

    ck = tmp_path / "ck.pt"

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise Crash

    # The interrupted and resumed runs read their batches from disk, as the stage does
    # (graft/base/arrays.py); the uninterrupted one from memory: the same weights all the same.
    np.save(tmp_path / "train_x.npy", train_split.x)
    on_disk = Split(NpyReader(tmp_path / "train_x.npy"), train_split.y)
    model, cfg = make_model()
    with pytest.raises(Crash):
        train(model, cfg, on_disk, val_split, p, ck, run_key="k", on_epoch=crash_after_first)
    assert ck.is_file()

    fresh, cfg = make_model()  # a new process would start from the pretrained weights again
    r = train(fresh, cfg, on_disk, val_split, p, ck, run_key="k")
    assert r.resumed_from == 1 and len(r.history) == 3
    resumed = fresh.state_dict()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_checkpoint_of_other_inputs_is_ignored(tmp_path, data):
    train_split, val_split = data
    ck = tmp_path / "ck.pt"
    model, cfg = make_model()
    train(model, cfg, train_split, val_split, replace(BASE, epochs=1), ck, run_key="old")
    model, cfg = make_model()
    r = train(model, cfg, train_split, val_split, replace(BASE, epochs=1), ck, run_key="new")
    assert r.resumed_from is None


def test_invalid_params_are_named():
    with pytest.raises(GraftError, match="fine_tune.lr_decay"):
        params.replace(BASE, "fine_tune", lr_decay=0.0)


def test_validation_loss_is_the_training_objective():
    """Train loss carries label smoothing; the val loss on the same chart must too, or the
    curves compare different quantities (1.6 against 0.75 on the default run)."""
    import torch.nn.functional as F

    from graft.training.fine_tune import smoothed_cross_entropy

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(32, 5)).astype(np.float32))
    y = rng.integers(0, 5, 32)
    probs = torch.softmax(logits, 1).numpy()
    for s in (0.0, 0.1, 0.3):
        want = F.cross_entropy(logits, torch.from_numpy(y), label_smoothing=s).item()
        assert smoothed_cross_entropy(probs, y, s) == pytest.approx(want, rel=1e-5)


def test_learning_curves_have_integer_epochs_and_say_what_differs(tmp_path):
    import matplotlib.pyplot as plt

    from graft.training.run import plot_learning_curves

    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5, "val_accuracy": 0.6} for e in (1, 2, 3)]
    captured = {}
    real_close = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig)
    try:
        plot_learning_curves(history, tmp_path / "c.png", label_smoothing=0.1)
    finally:
        plt.close = real_close
    loss_ax = captured["fig"].axes[0]
    assert "label smoothing 0.1" in loss_ax.get_title()
    assert all(float(t).is_integer() for t in loss_ax.get_xticks())
    assert any("augmented" in t.get_text() for t in loss_ax.get_legend().get_texts())
    from PIL import Image

    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (1000, 400)  # 10 x 4 inches at 100 dpi: the figure that was drawn
    real_close(captured["fig"])


def test_diverging_training_stops_at_the_first_non_finite_loss(tmp_path, data):
    """lr=1e6 once trained to NaN, saved the model and crashed evaluate later."""
    train_split, val_split = data
    model, cfg = make_model()
    ck = tmp_path / "ck.pt"
    p = replace(BASE, lr=1e6, mode="full", epochs=3)
    with pytest.raises(GraftError, match=r"training loss became (nan|inf).*fine_tune.lr = 1e\+06.*No model was saved") as e:
        train(model, cfg, train_split, val_split, p, checkpoint=ck)
    assert "epoch 1" in str(e.value) or "epoch 2" in str(e.value)
    # Only epochs that ended with finite losses are ever checkpointed.
    if ck.is_file():
        history = torch.load(ck, weights_only=False)["history"]
        assert all(np.isfinite(h["train_loss"]) for h in history)


def test_feature_extraction_runs_the_backbone_once_not_every_epoch(data):
    """The cache is the point of feature extraction: the backbone sees the train and val
    images once (in training-size batches), however many epochs the head trains."""
    import math

    train_split, val_split = data
    model, cfg = make_model()
    calls = []
    model.conv_stem.register_forward_hook(lambda *a: calls.append(1))
    p = replace(BASE, mode="feature_extraction", epochs=4, channels_last=False, patience=9)
    result = train(model, cfg, train_split, val_split, p)
    assert len(result.history) == 4
    once = math.ceil(len(train_split.y) / p.batch_size) + math.ceil(len(val_split.y) / p.batch_size)
    assert len(calls) == once


class LoadedMachine(threads.ThreadSizer):
    """A 2-CPU machine busy elsewhere while the training's step count is in ``busy``: the
    sizer's input, scripted, so the pool is re-sized mid-training without loading anything."""

    def __init__(self, busy: range, plan=None):
        super().__init__(interval=0.0, plan=plan)
        self.busy = busy
        self._last = (0.0, 0.0, 0.0)  # measure at every step

    def start(self, probe: float = 0.0) -> int:
        self._set(self.plan[0][1] if self.plan else 2, 0.0)
        return self.threads

    def measure(self) -> threads.Measure:
        others = 1.5 if self._done in self.busy else 0.0
        return threads.Measure(2, others, threads._target(2.0, others))


def test_a_pool_resized_mid_training_is_replayed_to_the_same_weights(tmp_path, data):
    """The thread count changes the weights' last bits, so the pool's sizes are recorded at
    the step of each change and a rerun given the record ends with the same weights; a run
    killed mid-schedule and resumed records what it ran with, and that replays too."""
    before = torch.get_num_threads()
    train_split, val_split = data
    p = replace(BASE, epochs=3, mode="full")  # 3 steps an epoch; the stem trains (its gradients follow the pool)

    def run(sizer, **kw):
        model, cfg = make_model()
        sizer.start()
        train(model, cfg, train_split, val_split, p, threads=sizer, **kw)
        return model.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    try:
        loaded = LoadedMachine(busy=range(4, 8))
        disturbed = run(loaded)
        assert loaded.describe() == "2; 1 after 4 steps; 2 after 9 steps"
        replay = run(LoadedMachine(busy=range(0), plan=threads.recorded_schedule(loaded.describe())))
        assert same(replay, disturbed)

        # Killed after epoch 2, inside the busy stretch (at 1 thread); resumed on a machine
        # now idle: the resumed run's record names its own pool, and replays to its weights.
        ck = tmp_path / "ck.pt"

        def crash_after_second(record):
            if record["epoch"] == 2:
                raise Crash

        with pytest.raises(Crash):
            run(LoadedMachine(busy=range(4, 8)), checkpoint=ck, run_key="k", on_epoch=crash_after_second)
        resumed_sizer = LoadedMachine(busy=range(0))
        resumed = run(resumed_sizer, checkpoint=ck, run_key="k")
        assert resumed_sizer.describe() == "2; 1 after 4 steps; 2 after 6 steps"
        again = run(threads.ThreadSizer(plan=threads.recorded_schedule(resumed_sizer.describe())))
        assert same(again, resumed)
        # (Whether another schedule changes these last bits depends on the CPU and on MKL's mode in
        # this process, which an earlier test may have set: it is measured in test_kernels.py, not assumed here.)
    finally:
        torch.set_num_threads(before)
