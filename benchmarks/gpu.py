"""GPU throughput: graft's training loop against a plain timm loop, at 224 px, on one GPU.

Both loops train the same model (``load_pretrained``'s backbone, full fine-tuning) on the
same Fashion-MNIST images prepared at ``--image-size``, at the same batch size, on the same
device, each as it runs there: graft's CUDA path (channels_last, autocast in bf16 where the
GPU supports it, else fp16 with a gradient scaler) against the shortest correct loop that
does the same (``benchmarks/transfer.py``'s ``plain_loop_images_per_second``). Rounds
alternate which loop goes first (the first pays for cuDNN's autotuning and the
allocator's warm-up) and lengthen until both loops vary by under 3 % between rounds; the
figures are each loop's median and their ratio, a ratio within the spread being parity.

The figures go to ``benchmarks/results-gpu.json`` with the machine (GPU name included).
Without a GPU it says so and exits 2; ``--device cpu`` runs the same code on the CPU, at a
small size, as a smoke test (``tests/unit/test_gpu_benchmark.py`` does).

Usage: python benchmarks/gpu.py [--json benchmarks/results-gpu.json] [--device cuda]
       [--image-size 224] [--batch-size 64] [--images 7168]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.transfer import ROUNDS, machine_info, measure_throughput, prepare, splits
from graft.base import fsio
from graft.config.params import FineTuneParams, IngestParams, LoadPretrainedParams, PreprocessParams, load_section
from graft.training.fine_tune import Split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke run of the same code (default: cuda)")
    parser.add_argument("--image-size", type=int, default=224, help="pixels, square (default: 224)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step, both loops (default: 64)")
    parser.add_argument("--images", type=int, default=7168, help="training images at most: the longest round (default: 7168)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"alternating rounds per length, even (default: {ROUNDS}; 2 for a smoke run)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file (atomically)")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.rounds % 2:
        parser.error("--rounds must be even and at least 2: each loop goes first equally often")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False). This benchmark "
              "measures a GPU: run it on a machine with one, or with --device cpu for a smoke run of the same code.",
              file=sys.stderr)  # fmt: skip
        return 2

    ingest_p = load_section(IngestParams, "ingest")
    # Enough of each class for --images training images after the validation split.
    per_class = max(4, math.ceil(args.images / 9))
    ingest_p = replace(ingest_p, max_train_per_class=per_class, max_test_per_class=2)
    pre_p = replace(load_section(PreprocessParams, "preprocess"), image_size=args.image_size)
    backbone = load_section(LoadPretrainedParams, "load_pretrained")
    ft = replace(load_section(FineTuneParams, "fine_tune"), device=args.device, batch_size=args.batch_size)
    machine = machine_info()
    print(f"GPU benchmark on {machine['gpu'] or machine['cpu']} ({args.device}), {backbone.architecture} at "
          f"{args.image_size} px, batch {args.batch_size}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(Path(tmp) / "data", ingest_p, pre_p, backbone.architecture)
        tr, va, _ = splits(prepared)
        tr = Split(tr.x[: args.images], tr.y[: args.images])
        t = measure_throughput(backbone, prepared, tr, va, ft, args.rounds)
    out = {"machine": machine, "settings": {"device": args.device, "image_size": args.image_size,
                                            "batch_size": args.batch_size, "architecture": backbone.architecture},
           "throughput": t}  # fmt: skip
    print(f"fine-tune throughput at {args.image_size} px on {args.device} (medians of {t['rounds']} alternating rounds of "
          f"{t['round_images']} images): graft {t['graft_images_per_second']:.0f} img/s, plain timm loop "
          f"{t['plain_loop_images_per_second']:.0f} img/s, ratio {t['ratio']:.2f}, spread {t['spread']:.1%}"
          f"{': parity' if t['parity'] else ''}", flush=True)  # fmt: skip
    if args.json:
        fsio.write_json(args.json, out)
        print(f"wrote {args.json}")
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
