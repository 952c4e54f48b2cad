"""fine_tune past one process: torchrun and DistributedDataParallel.

With ``fine_tune.nproc`` above 1 the ``fine_tune`` stage starts itself again under
``torch.distributed.run`` (torchrun), ``--standalone`` on this machine, one process per
rank; across machines the same stage command runs under a torchrun a person starts on
each node (``--nnodes``, ``--rdzv-endpoint``: README, "Training on several processes").
A process that finds torchrun's variables (``WORLD_SIZE``) is a rank and trains.

What keeps the ranks one training:

- the global batch stays ``fine_tune.batch_size``: every rank draws the same seeded epoch
  order and the same augmentation of the whole batch, then takes its own slice (so two
  ranks at 32 see exactly the images one process at 64 sees); DDP averages the gradients,
  and a slice's loss is weighted by its share of the batch, so uneven slices (the epoch's
  last batch) still give the global batch's mean;
- BatchNorm: in train mode each rank normalises with its own slice's statistics (with 2
  ranks, over 32 images instead of 64), and the running statistics are rank 0's (DDP
  broadcasts the buffers at every forward). ``fine_tune.sync_batchnorm`` computes the
  statistics over the whole global batch instead, on CUDA (torch has no CPU kernel);
- rank 0 alone validates, logs to MLflow and writes the history and the atomic
  checkpoint; the other ranks receive its verdict (best epoch, early stop) by broadcast,
  and on resume its checkpoint (so multi-node resume needs no shared disk). Each rank's
  torch RNG state is gathered into the checkpoint, so a resumed run draws the same
  dropout masks as one that never stopped.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

WORLD_ENV = "WORLD_SIZE"  # set by torchrun in every rank


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


def current() -> Rank:
    """This process's place in a torchrun job (rank 0 of 1 outside one)."""
    if WORLD_ENV not in os.environ:
        return Rank()
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ[WORLD_ENV]), int(os.environ.get("LOCAL_RANK", 0)))


def launch(nproc: int, module: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``python -m module argv`` as ``nproc`` ranks under torchrun on this machine;
    returns torchrun's exit code (non-zero when any rank failed; the others are stopped)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", module, *argv]  # fmt: skip
    # Without a number torchrun sets OMP_NUM_THREADS=1 and says so; graft's thread sizer
    # sets each rank's pool itself (graft/base/threads.py).
    env = {**(env or os.environ), "OMP_NUM_THREADS": (env or os.environ).get("OMP_NUM_THREADS", "1")}
    return subprocess.run(cmd, env=env).returncode


def init(rank: Rank, device) -> None:
    """Join the process group: NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist  # torch: ~2 s of import, paid where a model runs

    if rank.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    import torch.distributed as dist  # torch: ~2 s of import, paid where a model runs

    if dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, rank: Rank) -> tuple[slice, float]:
    """This rank's slice of a global batch of ``n`` samples, and the weight of its loss
    (its share of the batch times the world size: DDP's average of the weighted losses'
    gradients is then the gradient of the global batch's mean loss).

    A rank whose slice would be empty (a last batch smaller than the world) takes the
    batch's first sample with weight 0: every rank must join every gradient exchange."""
    bounds = np.linspace(0, n, rank.world + 1).round().astype(int)
    lo, hi = int(bounds[rank.rank]), int(bounds[rank.rank + 1])
    if hi == lo:
        return slice(0, 1), 0.0
    return slice(lo, hi), (hi - lo) / n * rank.world


def broadcast(obj: Any, rank: Rank) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not rank.distributed:
        return obj
    import torch.distributed as dist  # torch: ~2 s of import, paid where a model runs

    box = [obj if rank.leader else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, rank: Rank) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if not rank.distributed:
        return [obj]
    import torch.distributed as dist  # torch: ~2 s of import, paid where a model runs

    out = [None] * rank.world if rank.leader else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_checkpoint(path, rank: Rank) -> dict[str, Any] | None:
    """Rank 0 reads the checkpoint (if any) and every rank gets it: multi-node ranks need
    no shared disk."""
    import torch  # torch: ~2 s of import, paid where a model runs

    data = None
    if rank.leader and path is not None and path.is_file():
        data = path.read_bytes()
    data = broadcast(data, rank)
    return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
