"""The accuracy levers of fine_tune: a moving average of the weights (EMA), progressive
resizing and test-time augmentation, on the tiny synthetic images of test_fine_tune."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_fine_tune import BASE, Crash, data, make_model  # noqa: F401  (data: the fixture)

from graft.base.errors import GraftError
from graft.config import params
from graft.models import modeling
from graft.training.fine_tune import WeightAverage, progressive_size, train, with_tta

# The overrides that turn the committed params into a text run (what a pixel lever is refused against).
TEXT_RUN = ["ingest.source=texttable", "load_pretrained.source=packaged:minilm-l6", "load_pretrained.architecture=auto",
            "fine_tune.tta=none"]  # fmt: skip

def test_weight_average_follows_the_warmed_up_decay():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(net, decay=0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    for n in range(1, 30):
        with torch.no_grad():
            for t in net.parameters():
                t.add_(torch.randn_like(t))
        net.train()(torch.randn(4, 3))  # moves BatchNorm's running statistics too
        avg.update(net)
        d = min(0.9, 1 - (1 + (n - 1) / 10) ** -1)  # timm's warm-up: 0 first (a copy), then (n - 1) / (n + 9)
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * net.state_dict()[k]
    got = avg.model.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-5), k
    assert torch.equal(got["1.num_batches_tracked"], net.state_dict()["1.num_batches_tracked"])
    assert not any(t.requires_grad for t in avg.model.parameters())


def test_ema_ships_the_averaged_weights_and_resumes_exactly(tmp_path, data):  # noqa: F811
    train_split, val_split = data
    p = replace(BASE, epochs=3, ema_decay=0.9, patience=99)
    model, cfg = make_model()
    r = train(model, cfg, train_split, val_split, p)
    shipped = model.state_dict()
    plain, cfg = make_model()
    train(plain, cfg, train_split, val_split, replace(p, ema_decay=0.0))
    # Same batches, same steps: only the average differs, so the weights must.
    assert any(not torch.equal(shipped[k], plain.state_dict()[k]) for k in shipped if shipped[k].is_floating_point())
    assert r.best_val_accuracy >= 0.75

    ck = tmp_path / "ck.pt"

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise Crash

    interrupted, cfg = make_model()
    with pytest.raises(Crash):
        train(interrupted, cfg, train_split, val_split, p, ck, run_key="k", on_epoch=crash_after_first)
    assert "ema" in torch.load(ck, weights_only=False)
    fresh, cfg = make_model()
    r2 = train(fresh, cfg, train_split, val_split, p, ck, run_key="k")
    assert r2.resumed_from == 1
    assert all(torch.equal(fresh.state_dict()[k], shipped[k]) for k in shipped)


def test_progressive_sizes_grow_to_full_in_steps_of_eight():
    p = replace(BASE, epochs=5, min_image_size=32)
    assert [progressive_size(p, e, 64) for e in range(5)] == [32, 40, 48, 56, 64]
    assert [progressive_size(replace(p, epochs=1), 0, 64)] == [64]  # one epoch: the full size
    assert progressive_size(replace(p, min_image_size=96), 0, 64) == 64  # never above the data's size


def test_progressive_resizing_trains_small_and_validates_full(data):  # noqa: F811
    train_split, val_split = data
    model, cfg = make_model()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    r = train(model, cfg, train_split, val_split, replace(BASE, epochs=3, min_image_size=16, patience=99))
    assert [h["image_size"] for h in r.history] == [16, 24, 32]
    assert {s for training, s in seen if training} == {16, 24, 32}
    assert {s for training, s in seen if not training} == {32}  # validation: the prepared size


def test_tta_averages_the_mirror_image_and_is_saved_with_the_model(tmp_path, data):  # noqa: F811
    _, val_split = data
    model, cfg = make_model()
    model.eval()
    plain = modeling.predict_proba(model, val_split.x, cfg)
    mirrored = modeling.predict_proba(model, val_split.x[:, :, ::-1], cfg)
    tta_cfg = with_tta(cfg, "hflip")
    both = modeling.predict_proba(model, val_split.x, tta_cfg)
    assert np.allclose(both, (plain + mirrored) / 2, atol=1e-5)
    assert not np.allclose(both, plain, atol=1e-4)  # the view changes the prediction: a real average
    assert np.allclose(modeling.predict_proba(model, val_split.x, tta_cfg, tta="none"), plain, atol=1e-6)
    modeling.save(tmp_path / "m", model, tta_cfg)
    _, loaded = modeling.load(tmp_path / "m")
    assert modeling.tta_of(loaded) == "hflip" and modeling.tta_of(cfg) == "none"


def test_unknown_tta_is_named_with_what_the_modality_offers(data):  # noqa: F811
    train_split, val_split = data
    model, cfg = make_model()
    with pytest.raises(GraftError, match=r"fine_tune.tta='vflip'.*image.*hflip"):
        train(model, cfg, train_split, val_split, replace(BASE, tta="vflip"))


def test_bad_lever_values_are_named():
    for bad, key in (({"ema_decay": 1.0}, "ema_decay"), ({"min_image_size": 4}, "min_image_size")):
        with pytest.raises(GraftError, match=f"fine_tune.{key}"):
            params.replace(BASE, "fine_tune", **bad)


def test_a_tta_the_modality_lacks_is_refused_before_anything_runs(committed_params):
    from graft.config.params import ParamsError, read_params
    from graft.overrides import apply_overrides

    committed = read_params(committed_params)
    with pytest.raises(ParamsError, match=r"fine_tune.tta='vflip'.*image models; use one of: none, hflip"):
        apply_overrides(committed, ["fine_tune.tta=vflip"])
    text = ["ingest.source=texttable", "load_pretrained.source=packaged:minilm-l6", "load_pretrained.architecture=auto"]
    with pytest.raises(ParamsError, match=r"fine_tune.tta='hflip'.*text models; use one of: none$"):
        apply_overrides(committed, [*text, "fine_tune.tta=hflip"])
    assert apply_overrides(committed, [*text, "fine_tune.tta=none"])["fine_tune"]["tta"] == "none"


def test_mixup_blends_each_image_with_its_partner_by_lam():
    from graft.modalities import image

    batch = np.random.default_rng(1).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    assert image.mix(batch, np.random.default_rng(0), BASE) == (batch, None)  # neither asked: untouched
    p = replace(BASE, mixup_alpha=0.4)
    out, (perm, lam) = image.mix(batch, np.random.default_rng(0), p)
    assert sorted(perm) == list(range(16)) and 0 < lam < 1 and out.dtype == np.uint8
    expected = lam * batch.astype(float) + (1 - lam) * batch[perm]
    assert np.abs(out - expected).max() <= 0.5 + 1e-9  # the blend, rounded to the nearest level
    again, (perm2, lam2) = image.mix(batch, np.random.default_rng(0), p)  # the epoch's seeded generator decides
    assert np.array_equal(again, out) and np.array_equal(perm2, perm) and lam2 == lam


def test_cutmix_pastes_a_box_and_lam_is_the_share_kept():
    from graft.modalities import image

    batch = np.repeat(np.arange(16, dtype=np.uint8)[:, None, None, None] * 10, 32, 1).repeat(32, 2).repeat(3, 3)
    p = replace(BASE, cutmix_alpha=1.0)
    for seed in range(20):
        out, (perm, lam) = image.mix(batch, np.random.default_rng(seed), p)
        moved = perm != np.arange(16)
        own = (out == batch).all(-1)  # (N, H, W): pixels still the sample's own
        for i in np.flatnonzero(moved):
            # Every pixel is the sample's own or its partner's, and lam is the own share.
            assert ((out[i] == batch[i]) | (out[i] == batch[perm[i]])).all()
            assert own[i].mean() == pytest.approx(lam)
        pasted = ~own[moved]
        if pasted.any():  # one box for the whole batch: the same pixels in every image
            assert (pasted == pasted[0]).all()
            rows, cols = np.flatnonzero(pasted[0].any(1)), np.flatnonzero(pasted[0].any(0))
            assert pasted[0].sum() == len(rows) * len(cols)  # a rectangle
            assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))


def test_training_with_mixing_is_seeded_and_changes_the_weights(data):  # noqa: F811
    train_split, val_split = data
    p = replace(BASE, epochs=2, patience=99, mixup_alpha=0.4, cutmix_alpha=1.0)
    runs = []
    for recipe in (p, p, replace(p, mixup_alpha=0.0, cutmix_alpha=0.0)):
        model, cfg = make_model()
        r = train(model, cfg, train_split, val_split, recipe)
        assert all(np.isfinite(h["train_loss"]) for h in r.history)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # same seed, same mixes
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0] if runs[0][k].is_floating_point())


def test_mixing_is_refused_where_it_cannot_apply(committed_params):
    from graft.config.params import ParamsError, read_params
    from graft.overrides import apply_overrides

    with pytest.raises(GraftError, match="fine_tune.cutmix_alpha needs mode partial or full.*set it to 0"):
        params.replace(BASE, "fine_tune", mode="feature_extraction", cutmix_alpha=1.0)
    with pytest.raises(GraftError, match="fine_tune.mixup_alpha and fine_tune.cutmix_alpha need mode partial or full.*set them"):
        params.replace(BASE, "fine_tune", mode="feature_extraction", mixup_alpha=0.2, cutmix_alpha=1.0)
    with pytest.raises(GraftError, match="fine_tune.mixup_alpha"):
        params.replace(BASE, "fine_tune", mixup_alpha=-1.0)
    committed = read_params(committed_params)
    text = TEXT_RUN
    with pytest.raises(ParamsError, match=r"fine_tune.mixup_alpha is for images.*texts; set it to 0"):
        apply_overrides(committed, [*text, "fine_tune.mixup_alpha=0.2"])
    with pytest.raises(ParamsError, match=r"fine_tune.mixup_alpha and fine_tune.cutmix_alpha are for images.*set them to 0"):
        apply_overrides(committed, [*text, "fine_tune.mixup_alpha=0.2", "fine_tune.cutmix_alpha=1.0"])
    assert apply_overrides(committed, ["fine_tune.cutmix_alpha=1.0"])["fine_tune"]["cutmix_alpha"] == 1.0


def test_random_erasing_fills_one_box_of_the_asked_share_and_leaves_the_rest():
    from graft.modalities import image

    batch = np.full((400, 32, 32, 3), 128, dtype=np.uint8)
    plain = replace(BASE, hflip=False, crop_padding=0)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(image.augment(batch, rng_a, plain), batch)
    image.augment(batch, rng_b, replace(plain, erase_prob=0.0))
    assert rng_a.random() == rng_b.random()  # off: no draws, the other augmentations' streams unchanged
    out = image.augment(batch, np.random.default_rng(3), replace(plain, erase_prob=0.5))
    assert np.array_equal(batch, np.full_like(batch, 128))  # the input is not written to
    changed = (out != 128).any(-1)  # (N, H, W)
    erased = changed.any((1, 2))
    assert 0.4 < erased.mean() < 0.6
    for box in changed[erased]:
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        area = len(rows) * len(cols) / (32 * 32)
        assert 0.01 < area <= 0.4  # 2% to 1/3 asked, after rounding the sides
        assert box.sum() >= 0.9 * len(rows) * len(cols)  # a filled rectangle (noise may draw 128 by chance)
    again = image.augment(batch, np.random.default_rng(3), replace(plain, erase_prob=0.5))
    assert np.array_equal(again, out)  # the epoch's seeded generator decides
    assert not (image.augment(batch, np.random.default_rng(3), replace(plain, erase_prob=1.0)) == 128).all((1, 2, 3)).any()


def test_random_erasing_is_refused_where_it_cannot_apply(committed_params):
    from graft.config.params import ParamsError, read_params
    from graft.overrides import apply_overrides

    for bad in (-0.1, 1.5):
        with pytest.raises(GraftError, match=r"fine_tune.erase_prob has an invalid value: .* \(allowed: 0 to 1\)"):
            params.replace(BASE, "fine_tune", erase_prob=bad)
    with pytest.raises(GraftError, match="fine_tune.erase_prob needs mode partial or full"):
        params.replace(BASE, "fine_tune", mode="feature_extraction", erase_prob=0.5)
    committed = read_params(committed_params)
    text = TEXT_RUN
    with pytest.raises(ParamsError, match=r"fine_tune.erase_prob is for images.*texts; set it to 0"):
        apply_overrides(committed, [*text, "fine_tune.erase_prob=0.5"])
    assert apply_overrides(committed, ["fine_tune.erase_prob=0.25"])["fine_tune"]["erase_prob"] == 0.25


def test_randaugment_is_drawn_from_the_epochs_generator_and_leaves_the_process_state_alone():
    import random

    from graft.modalities import image

    batch = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    plain = replace(BASE, hflip=False, crop_padding=0)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    image.augment(batch, rng_a, plain)
    image.augment(batch, rng_b, replace(plain, randaug_ops=0))
    assert rng_a.random() == rng_b.random()  # off: no draws, the other augmentations' streams unchanged
    original = batch.copy()
    random.seed(11)
    np.random.seed(11)
    expected = random.random(), np.random.random()
    random.seed(11)
    np.random.seed(11)
    out = image.augment(batch, np.random.default_rng(5), replace(plain, randaug_ops=2, randaug_magnitude=9))
    assert (random.random(), np.random.random()) == expected  # timm's global draws were put back
    assert np.array_equal(batch, original)  # the input is not written to
    assert out.shape == batch.shape and out.dtype == np.uint8
    changed = (out != batch).any((1, 2, 3))
    assert 0.3 < changed.mean() < 1.0  # two ops at p 0.5 each: about 3 in 4 images change (some ops are no-ops here)
    again = image.augment(batch, np.random.default_rng(5), replace(plain, randaug_ops=2, randaug_magnitude=9))
    assert np.array_equal(again, out)  # the epoch's seeded generator decides, whatever the process's state
    other = image.augment(batch, np.random.default_rng(6), replace(plain, randaug_ops=2, randaug_magnitude=9))
    assert not np.array_equal(other, out)


def test_randaugment_is_refused_where_it_cannot_apply(committed_params):
    from graft.config.params import ParamsError, read_params
    from graft.overrides import apply_overrides

    for key, bad in (("randaug_ops", -1), ("randaug_ops", 11), ("randaug_magnitude", 11)):
        with pytest.raises(GraftError, match=rf"fine_tune.{key} has an invalid value: {bad} \(allowed: 0"):
            params.replace(BASE, "fine_tune", **{key: bad})
    with pytest.raises(GraftError, match="fine_tune.randaug_ops needs mode partial or full"):
        params.replace(BASE, "fine_tune", mode="feature_extraction", randaug_ops=2)
    committed = read_params(committed_params)
    text = TEXT_RUN
    with pytest.raises(ParamsError, match=r"fine_tune.randaug_ops is for images.*texts; set it to 0"):
        apply_overrides(committed, [*text, "fine_tune.randaug_ops=2"])
    assert apply_overrides(committed, ["fine_tune.randaug_ops=2"])["fine_tune"]["randaug_ops"] == 2
