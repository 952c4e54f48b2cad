"""Run under torchrun (or alone) by test_ddp.py: fine_tune's training core on a project's
prepared data, writing rank 0's per-step losses and each epoch's validation accuracy to JSON.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/integration/ddp_worker.py \\
        PROJECT BATCH EPOCHS OUT.json
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

from graft.base import distributed
from graft.config.params import FineTuneParams, load_section
from graft.data.splits import load_split
from graft.models import modeling
from graft.training.fine_tune import Split, train


def main() -> None:
    project, batch, epochs, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    p = load_section(FineTuneParams, "fine_tune", project / "params.yaml")
    p = replace(p, batch_size=batch, epochs=epochs, patience=epochs)
    model, cfg = modeling.load(project / "models" / "pretrained")
    tr, va = (Split(*load_split(project / "data" / "prepared", s)) for s in ("train", "val"))
    losses: list[float] = []
    result = train(model, cfg, tr, va, p, on_step=lambda step, loss: losses.append(loss))
    if distributed.current().leader:
        out.write_text(json.dumps({"losses": losses, "val_accuracy": [h["val_accuracy"] for h in result.history],
                                   "train_loss": [h["train_loss"] for h in result.history]}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
