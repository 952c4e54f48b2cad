"""Stage ``fine_tune``: train the new head (and, by mode, part or all of the backbone).

Transfer modes:

- ``feature_extraction``: the backbone is frozen, BatchNorm statistics included; its
  pooled features (for texts: mean-pooled sentence embeddings) are computed once and
  cached, so each epoch trains only the head on cached features (no augmentation: the
  cache is of un-augmented samples);
- ``partial``: the first ``frozen_groups`` layer groups stay frozen (images: the stem,
  then timm's blocks; texts: the embeddings, then the transformer layers), the rest and
  the head train;
- ``full``: everything trains.

Optionally the head trains alone for ``head_epochs`` first (gradual unfreezing), and
earlier layer groups get smaller learning rates (``lr_decay``, discriminative LRs).
With a teacher (the ``teach`` stage, ``distill`` in params.yaml) the loss is knowledge
distillation's: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``,
the teacher's logits cached for the un-augmented training samples (:func:`distillation_loss`).

Every epoch ends with an atomic checkpoint (model, optimizer, scheduler, RNG state,
history); a rerun with the same inputs resumes from it and ends with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from graft.base import distributed, fsio
from graft.base.arrays import NpyReader, NpyWriter
from graft.base.errors import GraftError, fault_point, progress
from graft.base.threads import ThreadSizer
from graft.config.params import FineTuneParams
from graft.models import modeling


@dataclass
class Split:
    x: Any  # encoded samples, indexable like an array: an NpyReader (on disk) or an ndarray
    y: np.ndarray  # int64 (N,)


@dataclass
class Distillation:
    """A teacher's logits for the training split (N, M teachers, C), in the split's order,
    and the student's distillation hyperparameters."""

    logits: Any  # an NpyReader (on disk) or an ndarray
    temperature: float
    alpha: float


def distillation_loss(logits, teacher_logits, y, temperature: float, alpha: float, label_smoothing: float = 0.0):
    """Hinton et al.'s loss: ``alpha * T^2 * KL(p_teacher || p_student)`` at temperature T,
    plus ``(1 - alpha)`` times the labels' cross-entropy (with the run's label smoothing).

    ``teacher_logits`` is (B, M, C): an ensemble's members are averaged as probabilities at
    temperature T. The T^2 keeps the soft term's gradients at the same scale whatever T."""
    import torch.nn.functional as F  # torch: ~2 s of import, paid where a model runs

    t = temperature
    target = (teacher_logits.float() / t).softmax(-1).mean(1)
    soft = F.kl_div(F.log_softmax(logits.float() / t, -1), target, reduction="batchmean")
    hard = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    return alpha * t * t * soft + (1 - alpha) * hard


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_accuracy: float
    best_state: dict[str, Any]
    stopped_early: bool
    resumed_from: int | None = None
    parameters: dict[str, int] = field(default_factory=dict)


# --- freezing and parameter groups ---------------------------------------------------------


def layer_groups(model) -> list[list[tuple[str, Any]]]:
    """The model's parameters in timm's coarse layer groups, input side first; the last
    group is the classifier head."""
    from timm.models import group_parameters  # timm (with torch): ~4 s of import, paid where a model is built

    named = dict(model.named_parameters())
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = group_parameters(model, model.group_matcher(coarse=True))
    backbone = [[(n, named[n]) for n in names if id(named[n]) not in head] for _, names in sorted(groups.items())]
    backbone = [g for g in backbone if g]
    return [*backbone, [(n, p) for n, p in named.items() if id(p) in head]]


def trainable_groups(n_groups: int, mode: str, frozen_groups: int) -> list[int]:
    """Indices of the groups that train in ``mode`` once unfrozen (the head is last)."""
    head = n_groups - 1
    if mode == "feature_extraction":
        return [head]
    if mode == "full":
        return list(range(n_groups))
    if frozen_groups >= head:
        raise GraftError(
            f"params.yaml: fine_tune.frozen_groups={frozen_groups} freezes the whole backbone "
            f"({head} groups); use mode feature_extraction, or a value below {head}"
        )
    return list(range(frozen_groups, n_groups))


def set_trainable(groups, active: list[int]) -> None:
    for i, group in enumerate(groups):
        for _, p in group:
            p.requires_grad_(i in active)


def freeze_batchnorm_stats(model) -> None:
    """Put every BatchNorm whose parameters are frozen in eval mode, so its running
    statistics stay the pretrained ones (call after ``model.train()``)."""
    import torch  # torch: ~2 s of import, paid where a model runs

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def optimizer_groups(groups, active: list[int], p: FineTuneParams) -> list[dict[str, Any]]:
    """One AdamW group per layer group that trains: head at ``lr``, each group below it
    at ``lr * lr_decay**depth``. Biases and norm weights get no weight decay."""
    head = len(groups) - 1
    out = []
    for i in active:
        lr = p.lr * p.lr_decay ** (head - i)
        decay = [t for n, t in groups[i] if t.ndim > 1]
        no_decay = [t for n, t in groups[i] if t.ndim <= 1]
        for params, wd, kind in ((decay, p.weight_decay, "w"), (no_decay, 0.0, "b")):
            if params:
                out.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"group{i}_{kind}"})
    return out


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return f


# The weight average's decay warms up as timm's ``1 - (1 + step / GAMMA) ** -POWER``: about
# (n - 1) / (n + 9) after n updates, so the average forgets the pretrained starting point
# within a few hundred steps instead of the thousands ``decay`` alone would take.
EMA_WARMUP_GAMMA, EMA_WARMUP_POWER = 10.0, 1.0


class WeightAverage:
    """An exponential moving average of a model's weights (parameters and BatchNorm
    statistics; counters are copied), updated after every optimizer step: the averaged
    model generalises better than the last step's, most of all at the end of a short
    schedule. timm's ``ModelEmaV3`` does the averaging; this keeps the step count that
    its warm-up needs, and saves both in the checkpoint so a resumed run goes on exactly."""

    def __init__(self, model, decay: float):
        from timm.utils import ModelEmaV3  # timm: imported by the training that asks for an average

        self.updates = 0
        self.average = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_gamma=EMA_WARMUP_GAMMA,
                                  warmup_power=EMA_WARMUP_POWER)  # fmt: skip
        for t in self.model.parameters():
            t.requires_grad_(False)

    @property
    def model(self):
        return self.average.module

    def update(self, model) -> None:
        self.updates += 1
        self.average.update(model, step=self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def progressive_size(p: FineTuneParams, epoch: int, full: int) -> int:
    """The input size of ``epoch`` under progressive resizing: ``min_image_size`` at the
    first epoch, growing linearly to the prepared size at the last, in steps of 8 pixels
    (what the networks' strides divide evenly); validation and testing stay at full size."""
    low = min(p.min_image_size or full, full)
    frac = epoch / (p.epochs - 1) if p.epochs > 1 else 1.0  # a single epoch trains at full size
    return min(full, max(low, int(round((low + (full - low) * frac) / 8)) * 8))


def with_tta(cfg: modeling.ModelConfig, tta: str) -> modeling.ModelConfig:
    """The model's config with its test-time augmentation, saved in model.json so that
    evaluate, the promotion gate and the registered pyfunc predict the same way."""

    return replace(cfg, input={**cfg.input, "tta": tta}) if tta != "none" else cfg


# --- data --------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> tuple[np.ndarray, np.random.Generator]:
    """Shuffle and augmentation randomness of one epoch depend only on (seed, epoch), so a
    resumed run sees exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n), rng


# --- the training loop ---------------------------------------------------------------------


def _features(model, x, cfg, device, p: FineTuneParams, desc: str, path: Path):
    """Pooled backbone features (N, F) in eval mode, written to ``path`` as they come and
    read back a batch at a time: the feature-extraction cache, on disk like the data.

    Computed at the training batch size, not eval_batch_size: on the 2-core CPU the
    backbone ran 890 to 1,190 images/s at 64 images a batch and 690 to 760 at 256 (the
    activations outgrow the cache). Validation keeps eval_batch_size: its rounding
    decides ties between epochs, so changing it would change the default run's model."""
    import torch  # torch: ~2 s of import, paid where a model runs

    model.eval()
    writer = None
    with torch.inference_mode():
        for s in progress(range(0, len(x), p.batch_size), desc=desc, unit="batch"):
            inp = modeling.to_input(x[s : s + p.batch_size], cfg, device, p.channels_last)
            f = model.forward_head(model.forward_features(inp), pre_logits=True).float().cpu().numpy()
            if writer is None:
                writer = NpyWriter(path, np.float32, (len(x), *f.shape[1:]))
            writer.write(s, f)
    assert writer is not None, f"{desc}: no samples"  # validate refuses an empty split before this
    writer.close()
    return NpyReader(path)


def _evaluate(model, split: Split, cfg, device, p: FineTuneParams, feats=None) -> tuple[float, float, float]:
    """Validation loss, negative log-likelihood and accuracy.

    The loss is the training objective, cross-entropy with the same label smoothing, so
    the train and val curves measure the same thing (train still differs by augmentation
    and dropout, which the chart says). The NLL (no smoothing, a proper scoring rule)
    breaks ties in accuracy when choosing the best epoch, as it always has: a chart's
    fix must not change which model ships."""
    import torch  # torch: ~2 s of import, paid where a model runs
    import torch.nn.functional as F  # torch: ~2 s of import, paid where a model runs

    if feats is not None:
        with torch.inference_mode():
            model.eval()
            head = model.get_classifier()
            logits = torch.cat([head(torch.from_numpy(feats[s : s + p.eval_batch_size]).to(device)).float()
                                for s in range(0, len(feats), p.eval_batch_size)])  # fmt: skip
            y = torch.from_numpy(split.y).to(device)
            loss = F.cross_entropy(logits, y, label_smoothing=p.label_smoothing).item()
            return loss, F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
    probs = modeling.predict_proba(model, split.x, cfg, device, p.eval_batch_size, p.channels_last)
    return (smoothed_cross_entropy(probs, split.y, p.label_smoothing), smoothed_cross_entropy(probs, split.y, 0.0),
            float((probs.argmax(1) == split.y).mean()))  # fmt: skip


def smoothed_cross_entropy(probs: np.ndarray, y: np.ndarray, smoothing: float) -> float:
    """Mean cross-entropy against labels smoothed like ``F.cross_entropy(label_smoothing=)``:
    (1 - s) on the true class's log-probability plus s spread evenly over all classes."""
    logp = np.log(np.clip(probs, 1e-12, None))
    nll = -logp[np.arange(len(y)), y]
    uniform = -logp.mean(1)
    return float(((1 - smoothing) * nll + smoothing * uniform).mean())


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Precision:
    """Where a run computes and at what precision: bf16 autocast on a CUDA GPU that has it
    (fp16 with a gradient scaler on one that has not), fp32 on the CPU, where bf16 measured
    slower for these models."""

    device: Any
    enabled: bool
    dtype: Any
    scaler: Any

    @classmethod
    def on(cls, device) -> Precision:
        import torch  # torch: ~2 s of import, paid where a model runs

        enabled = device.type == "cuda"
        dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
        return cls(device, enabled, dtype, torch.amp.GradScaler("cuda", enabled=enabled and dtype == torch.float16))

    def autocast(self):
        import torch  # torch: ~2 s of import, paid where a model runs

        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.enabled)

    def step(self, loss, weight: float, optimizer) -> None:
        """Backward and an optimizer step (``weight``: this rank's share of the global batch)."""
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def place(model, p: FineTuneParams, rk: distributed.Rank):
    """The device of this rank and the model on it (SyncBatchNorm under torchrun on GPUs
    when asked, channels_last when asked); the process group joined when distributed."""
    import torch  # torch: ~2 s of import, paid where a model runs

    device = modeling.resolve_device(p.device)
    if rk.distributed and device.type == "cuda":
        device = torch.device("cuda", rk.local)  # one GPU per rank on its node
    if rk.distributed and p.mode == "feature_extraction":
        raise GraftError("fine_tune: feature_extraction trains the head on cached features in one process; "
                         "set fine_tune.nproc to 1 for it")  # fmt: skip
    if rk.distributed and p.sync_batchnorm:
        if device.type != "cuda":
            raise GraftError("params.yaml: fine_tune.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU "
                             "kernel); on CPU leave it false: each rank normalises with its own slice's statistics")  # fmt: skip
        from timm.layers import convert_sync_batchnorm  # timm (with torch): ~4 s of import, paid where a model is built

        model = convert_sync_batchnorm(model)  # same parameter and buffer names: it saves as the plain model
    return model, device


@dataclass
class Progress:
    """What a run has learnt about itself so far, and what a checkpoint carries of it:
    each epoch's record, the best epoch by validation accuracy (ties: the lower NLL) with
    its weights, and how many epochs have passed without a better one (early stopping)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, Any] = field(default_factory=dict)

    def add(self, record: dict[str, Any], shipped) -> None:
        self.history.append(record)
        if record["val_accuracy"] > self.best_acc or (record["val_accuracy"] == self.best_acc and
                                                      record["val_nll"] < self.best_loss):  # fmt: skip
            self.best_acc, self.best_loss, self.best_epoch, self.bad_epochs = (record["val_accuracy"], record["val_nll"],
                                                                               record["epoch"], 0)  # fmt: skip
            self.best_state = {k: v.detach().cpu().clone() for k, v in shipped.state_dict().items()}
        else:
            self.bad_epochs += 1

    def patience_spent(self, p: FineTuneParams) -> bool:
        return bool(self.history) and self.bad_epochs >= p.patience

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "best_state": self.best_state, "best_acc": self.best_acc,
                "best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}  # fmt: skip

    @classmethod
    def from_state(cls, ck: dict[str, Any]) -> Progress:
        return cls(ck["history"], ck["best_acc"], ck["best_loss"], ck["best_epoch"], ck["bad_epochs"], ck["best_state"])


@dataclass
class Loop:
    """One training run's moving parts, composed by :func:`train`: the model and what the
    batches go through (the model, or its DDP wrapper), the optimizer and its schedule,
    the weight average, precision, the cached features of feature extraction."""

    model: Any
    cfg: modeling.ModelConfig
    p: FineTuneParams
    rk: distributed.Rank
    precision: Precision
    groups: list
    active: list[int]
    optimizer: Any
    scheduler: Any
    ema: WeightAverage | None
    distill: Distillation | None = None
    threads: ThreadSizer | None = None
    on_step: Callable[[int, float], None] | None = None
    cached: tuple[Any, Any] | None = None
    net: Any = None
    wrapped_for: list[int] | None = None

    @property
    def shipped(self):
        """What validation judges is what ships: the weight average when there is one."""
        return self.ema.model if self.ema is not None else self.model

    # --- checkpoints ---

    def checkpoint_state(self, run_key: str, epoch: int, progress: Progress, rngs, extra) -> dict[str, Any]:
        import torch  # torch: ~2 s of import, paid where a model runs

        return {
            "run_key": run_key, "epoch": epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "torch_rng_ranks": rngs, **progress.state(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}), **(extra or {}),
            # the pool's sizes so far: a resumed run's record goes on from them
            **({"thread_schedule": self.threads.describe()} if self.threads is not None else {}),
        }  # fmt: skip

    def resume(self, ck: dict[str, Any]) -> Progress:
        """Model, optimizer, schedule, average and this rank's RNG as the checkpoint left them."""
        import torch  # torch: ~2 s of import, paid where a model runs

        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(ck["ema"])
        # Each rank's own RNG state where the checkpoint has it (a checkpoint of another
        # world size, or older than graft's torchrun, has rank 0's alone).
        rngs = ck.get("torch_rng_ranks") or []
        torch.set_rng_state(rngs[self.rk.rank] if self.rk.distributed and self.rk.rank < len(rngs) else ck["torch_rng"])
        return Progress.from_state(ck)

    # --- one epoch ---

    def wrap(self, unfrozen: list[int]) -> None:
        """DDP fixes the parameters it synchronises when it is built: a new wrapper when
        gradual unfreezing changes them (every rank at the same epoch)."""
        if not self.rk.distributed or self.wrapped_for == unfrozen:
            return
        from torch.nn.parallel import DistributedDataParallel  # torch: ~2 s of import, paid where a model runs

        self.net = None
        device = self.precision.device
        self.net = DistributedDataParallel(self.model, device_ids=[self.rk.local] if device.type == "cuda" else None)
        self.wrapped_for = unfrozen

    def batch_loss(self, split: Split, idx: np.ndarray, part, epoch: int, rng):
        """The loss of one batch (this rank's slice of it), its logits and labels, the mixed
        partners' labels and mix (None unmixed), and the input size (progressive resizing)."""
        import torch  # torch: ~2 s of import, paid where a model runs
        import torch.nn.functional as F  # torch: ~2 s of import, paid where a model runs

        p, cfg, device, distill = self.p, self.cfg, self.precision.device, self.distill
        y = torch.from_numpy(split.y[idx][part]).to(device)
        mixed, size = None, None  # mixup / CutMix: (each sample's partner in the batch, the weight of its own label)
        with self.precision.autocast():
            if self.cached is not None:
                feats = torch.from_numpy(self.cached[0][idx]).to(device)
                drop = getattr(self.model, "drop_rate", 0.0)
                logits = self.model.get_classifier()(F.dropout(feats, p=drop, training=True))
            else:
                # The whole batch is augmented on every rank, then sliced: the same
                # random flips and crops as one process, whatever the world size.
                # Mixed before slicing, too: a sample's partner may be on another rank.
                batch, mixed = cfg.kind.mix(cfg.kind.augment(split.x[idx], rng, p), rng, p)
                batch = batch[part]
                inp = modeling.to_input(batch, cfg, device, p.channels_last)
                if p.min_image_size is not None:
                    size = progressive_size(p, epoch, inp.shape[-1])
                    inp = cfg.kind.rescale(inp, size)
                logits = (self.net if self.net is not None else self.model)(inp)
            # The teacher's view is the un-augmented sample: flips and 4-pixel shifts
            # leave its prediction nearly unchanged, and it costs no teacher forward.
            teacher = np.asarray(distill.logits[idx]) if distill is not None else None
            partner = None if mixed is None else torch.from_numpy(split.y[idx][mixed[0]][part]).to(device)

            def criterion(labels, order=slice(None)):  # against the labels (and teachers) of batch[order]
                if teacher is None:
                    return F.cross_entropy(logits.float(), labels, label_smoothing=p.label_smoothing)
                soft = torch.from_numpy(teacher[order][part]).to(device)
                return distillation_loss(logits, soft, labels, distill.temperature, distill.alpha, p.label_smoothing)

            # A mixed sample's target is the same mix of both samples' targets; the
            # losses are linear in the target, so it is the same mix of both losses.
            loss = criterion(y) if mixed is None else mixed[1] * criterion(y) + (1 - mixed[1]) * criterion(partner, mixed[0])
        return loss, logits, y, partner, mixed, size

    def report_step(self, step: int, loss: float, n: int, weight: float) -> None:
        """``on_step`` with the loss over the whole (global) batch, on rank 0."""
        if self.on_step is None:
            return
        if self.rk.distributed:  # the global batch's mean: the slices' sums over their sizes
            import torch  # torch: ~2 s of import, paid where a model runs
            import torch.distributed as dist  # torch: ~2 s of import, paid where a model runs

            sums = torch.tensor([loss * n * (weight > 0), n * (weight > 0)], dtype=torch.float64)
            dist.all_reduce(sums)
            loss = float(sums[0] / sums[1])
        if self.rk.leader:
            self.on_step(step, loss)

    def epoch(self, split: Split, epoch: int, steps_per_epoch: int) -> tuple[float, float, int | None]:
        """Train one epoch; the summed training loss and correct count over every rank's
        slices, and the epoch's input size (None without progressive resizing)."""
        import torch  # torch: ~2 s of import, paid where a model runs

        p, rk = self.p, self.rk
        unfrozen = self.active if epoch >= p.head_epochs else [len(self.groups) - 1]
        set_trainable(self.groups, unfrozen)
        self.wrap(unfrozen)
        self.model.train()
        freeze_batchnorm_stats(self.model)
        order, rng = epoch_order(len(split.y), p.seed, epoch)
        size = None  # progressive resizing: this epoch's input size, known from the first batch
        total_loss, correct, seen = 0.0, 0.0, 0  # correct: mixed targets count fractions
        bar = progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{p.epochs}", unit="batch", leave=False,
                       disable=not rk.leader)  # fmt: skip
        for b in bar:
            idx = np.sort(order[b * p.batch_size : (b + 1) * p.batch_size])
            # Under torchrun: this rank's slice of the global batch (all of it otherwise).
            part, weight = distributed.shard(len(idx), rk) if rk.distributed else (slice(None), 1.0)
            loss, logits, y, partner, mixed, size = self.batch_loss(split, idx, part, epoch, rng)
            if not torch.isfinite(loss):
                # One NaN poisons every weight it reaches: stop before the step, save nothing.
                raise GraftError(
                    f"fine_tune: the training loss became {loss.item()} at epoch {epoch + 1}, batch {b + 1}: training "
                    f"diverged. The usual cause is a learning rate too high (fine_tune.lr = {p.lr:g}); lower it, e.g. "
                    f"`graft run --set fine_tune.lr={p.lr / 10:g}`. No model was saved."
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.step(loss, weight, self.optimizer)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            if self.threads is not None:  # re-sized, or replayed, at this step count: recorded
                self.threads.step(epoch * steps_per_epoch + b + 1)
            if weight:  # a zero-weight stand-in sample counts for nothing
                total_loss += loss.item() * len(y)
                hits = logits.argmax(1)
                if mixed is None:
                    correct += int((hits == y).sum())
                else:  # against the mixed target: each label at its weight in it
                    correct += mixed[1] * float((hits == y).sum()) + (1 - mixed[1]) * float((hits == partner).sum())
                seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            self.report_step(epoch * steps_per_epoch + b + 1, loss.item(), len(y), weight)
            fault_point(f"fine_tune_rank{rk.rank}_epoch{epoch + 1}_batch{b + 1}")  # the kill tests' mid-epoch point
        if rk.distributed:  # the epoch's training loss and accuracy over every rank's slices
            import torch.distributed as dist  # torch: ~2 s of import, paid where a model runs

            sums = torch.tensor([total_loss, correct, seen], dtype=torch.float64)
            dist.all_reduce(sums)
            total_loss, correct = float(sums[0]), float(sums[1])
        return total_loss, correct, size


def build_loop(model, cfg: modeling.ModelConfig, p: FineTuneParams, steps_per_epoch: int, **hooks) -> Loop:
    """The model placed on its device, its layer groups frozen by mode, AdamW with one
    learning rate per group under warm-up and cosine decay, and the weight average."""
    import torch  # torch: ~2 s of import, paid where a model runs

    rk = distributed.current()
    model, device = place(model, p, rk)
    modeling.check_tta(cfg.kind, p.tta, "params.yaml: fine_tune.tta")
    cfg = with_tta(cfg, p.tta)  # validation predicts as the shipped model will
    distributed.init(rk, device)
    model.to(device)
    if p.channels_last:
        model.to(memory_format=torch.channels_last)
    groups = layer_groups(model)
    active = trainable_groups(len(groups), p.mode, p.frozen_groups)
    set_trainable(groups, active)
    optimizer = torch.optim.AdamW(optimizer_groups(groups, active, p))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(p.epochs * steps_per_epoch, round(p.warmup_epochs * steps_per_epoch))
    )
    precision = Precision.on(device)
    ema = WeightAverage(model, p.ema_decay) if p.ema_decay else None
    return Loop(model, cfg, p, rk, precision, groups, active, optimizer, scheduler, ema, **hooks)


def feature_cache(loop: Loop, train_split: Split, val_split: Split, checkpoint: Path | None):
    """Feature extraction's cached backbone features of both splits, in a folder beside
    the checkpoint (on disk; the system temp folder may be RAM) that the caller removes."""
    where = checkpoint.parent if checkpoint is not None else None
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        for stale in where.glob(".graft-features-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    folder = tempfile.TemporaryDirectory(prefix=".graft-features-", dir=where)
    device, p = loop.precision.device, loop.p
    cached = (
        _features(loop.model, train_split.x, loop.cfg, device, p, "caching train features", Path(folder.name) / "train.npy"),
        _features(loop.model, val_split.x, loop.cfg, device, p, "caching val features", Path(folder.name) / "val.npy"),
    )
    return cached, folder


def epoch_record(loop: Loop, epoch: int, n: int, totals: tuple[float, float, int | None], val, seconds) -> dict:
    """One epoch's row of the history: losses, accuracies, speed, parameters, threads, LRs."""
    import torch  # torch: ~2 s of import, paid where a model runs

    total_loss, correct, size = totals
    val_loss, val_nll, val_acc = val
    t0, train_seconds = seconds
    counts = modeling.count_parameters(loop.model)
    record = {
        "epoch": epoch + 1,
        "train_loss": total_loss / n,
        "train_accuracy": correct / n,
        "val_loss": val_loss,
        "val_nll": val_nll,
        "val_accuracy": val_acc,
        "epoch_seconds": time.perf_counter() - t0,
        "samples_per_second": n / train_seconds,
        "trainable_parameters": counts["trainable"],
        "frozen_parameters": counts["frozen"],
        "threads": torch.get_num_threads(),  # at the epoch's end: throughput is read against it
    }
    if size:
        record["image_size"] = size
    for g in loop.optimizer.param_groups:  # one learning rate per layer group
        record.setdefault(f"lr_{g['name'].rsplit('_', 1)[0]}", g["lr"])
    return record


# The composition of the parts above, over 80 lines with its 12 parameters and their
# docstring; the loop itself is about 60.
def train(
    model,
    cfg: modeling.ModelConfig,
    train_split: Split,
    val_split: Split,
    p: FineTuneParams,
    checkpoint: Path | None = None,
    run_key: str = "",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    distill: Distillation | None = None,
    threads: ThreadSizer | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place; the pure core of the stage (no params file, no MLflow).

    ``checkpoint`` is rewritten atomically after every epoch; if it exists and was made
    with the same ``run_key``, training resumes from it; ``checkpoint_extra`` is stored in
    it as is (the MLflow run id, say). ``on_epoch`` receives each epoch's record (for
    logging); if it raises, training stops after the checkpoint. ``distill``: train on a
    teacher's soft labels as well as the labels (:func:`distillation_loss`). ``threads``:
    re-sizes torch's thread pool between batches to the CPUs other processes leave free,
    or replays a recorded schedule, noting the step of each change (the checkpoint keeps it).
    ``on_step(step, loss)``: each optimizer step's loss over the whole (global) batch, on
    rank 0.

    Under torchrun (``graft.base.distributed``) every rank calls this with the same arguments:
    each trains on its slice of every batch, rank 0 alone validates and writes.

    The loop is composed of parts: :func:`build_loop` (device, precision, groups,
    optimizer, schedule, average), :class:`Progress` (history, best epoch, early
    stopping), :meth:`Loop.resume` and :meth:`Loop.checkpoint_state`, :meth:`Loop.epoch`.
    """
    import torch  # torch: ~2 s of import, paid where a model runs

    rk = distributed.current()
    torch.manual_seed(p.seed + rk.rank)  # rank 0 draws what a single process draws
    steps_per_epoch = math.ceil(len(train_split.y) / p.batch_size)
    loop = build_loop(model, cfg, p, steps_per_epoch, distill=distill, threads=threads, on_step=on_step)
    model = loop.model

    state, start, resumed_from = Progress(), 0, None
    if rk.distributed:
        ck = distributed.broadcast_checkpoint(checkpoint, rk) or {}
    else:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint and checkpoint.is_file() else {}
    if ck and ck.get("run_key") == run_key:
        state = loop.resume(ck)
        start = resumed_from = ck["epoch"] + 1
        if threads is not None:
            threads.resume_at(start * steps_per_epoch, ck.get("thread_schedule"))
        if rk.leader:
            print(f"fine_tune: resuming after epoch {ck['epoch'] + 1} from {checkpoint}")
    if state.patience_spent(p):
        start = p.epochs  # the interrupted run had already stopped early

    cache_folder = None
    if p.mode == "feature_extraction" and start < p.epochs:
        t0 = time.perf_counter()
        loop.cached, cache_folder = feature_cache(loop, train_split, val_split, checkpoint)
        cache_seconds = time.perf_counter() - t0
    stopped_early = False
    for epoch in range(start, p.epochs):
        t0 = time.perf_counter()
        totals = loop.epoch(train_split, epoch, steps_per_epoch)
        train_seconds = time.perf_counter() - t0
        # Rank 0 validates (its BatchNorm statistics are the ones DDP spreads) and every
        # rank takes its verdict, so they all stop at the same epoch.
        # Cached features are of the plain samples: with test-time views, the backbone runs.
        feats = loop.cached[1] if loop.cached and p.tta == "none" else None
        val = _evaluate(loop.shipped, val_split, loop.cfg, loop.precision.device, p, feats) if rk.leader else None
        val = distributed.broadcast(val, rk)
        record = epoch_record(loop, epoch, len(train_split.y), totals, val, (t0, train_seconds))
        if loop.cached is not None and epoch == start:
            record["feature_cache_seconds"] = cache_seconds
        state.add(record, loop.shipped)
        if rk.leader:
            print(
            f"epoch {epoch + 1}/{p.epochs}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
            f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} | {record['samples_per_second']:.0f} "
            f"samples/s, {record['epoch_seconds']:.1f}s, {record['trainable_parameters']:,} trainable",
            flush=True,
            )  # fmt: skip
        rngs = distributed.gather(torch.get_rng_state(), rk)  # every rank's, for an exact resume
        if checkpoint is not None and rk.leader:
            with fsio.atomic_path(checkpoint) as tmp:
                torch.save(loop.checkpoint_state(run_key, epoch, state, rngs, checkpoint_extra), tmp)
        if on_epoch is not None and rk.leader:
            on_epoch(record)
        if state.bad_epochs >= p.patience:
            stopped_early = True
            if rk.leader:
                print(f"fine_tune: no better validation accuracy for {p.patience} epochs; stopping early")
            break
    if cache_folder is not None:
        loop.cached = None
        cache_folder.cleanup()
    if not state.best_state:
        raise GraftError("fine_tune: no epoch completed")
    model.load_state_dict(state.best_state)
    set_trainable(loop.groups, loop.active)
    return TrainResult(state.history, state.best_epoch, state.best_acc, state.best_state, stopped_early, resumed_from,
                       modeling.count_parameters(model))  # fmt: skip
