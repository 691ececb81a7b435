"""`slimserve optimize NAME --repository DIR --recipe STEPS [--recipe ...] --data DATA`.

Importing this module loads no framework; the handler imports the pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slimserve.cli_parts import command
from slimserve.errors import InvalidArgument
from slimserve.fields import build
from slimserve.repository.cli import repository_option

_RECIPE_HELP = (
    "Steps joined by '+', one variant per --recipe: deep-compression[:ratio=40], int8, "
    "static-int8[:calibration=minmax|percentile|entropy], weight-int8, int4:group=64, "
    "qat:epochs=1, bf16, fp16, onnx, prune:0.9[,rounds=4,epochs=2], structured:0.3[,rounds=3,"
    "epochs=1], finetune:epochs=3, distill:hidden=256, share:bits=5[,epochs=1] (a "
    "text-generation model: int8, weight-int8, int4:group=32); e.g. "
    "prune:0.9+finetune:epochs=3+int8, onnx+static-int8. Or a YAML recipe file (name:, steps:)."
)


ABOUT = """Make cheaper variants of a model (quantize, prune, distill, ...).
Run each recipe on the model's version; write each result as a measured variant (variant.yaml
with recipe and profile, MANIFEST.json) and a report (NAME/reports/VERSION/report.md|json|png).
"""


def register(subparsers: Any) -> None:
    p = command(subparsers, "optimize", _handle, ABOUT)
    p.add_argument("name", metavar="NAME", help="The model in the repository.")
    repository_option(p)
    p.add_argument("--recipe", action="append", required=True, metavar="STEPS", help=_RECIPE_HELP)
    p.add_argument(
        "--data",
        metavar="DATA",
        help="Training/calibration data: .npz (x, y), .csv (label column), .jsonl "
        "(v2 requests), IDX (*-images-idx3-ubyte[.gz]), fashion-mnist[:train|:test] "
        "or digits[:train|:test]. Needed by steps that train or calibrate (deep-compression, "
        "finetune, distill, qat, static-int8, prune/structured/share with epochs=); without "
        "it, inputs are made from model.yaml and accuracy is not measured. A text-generation "
        "model takes a plain text file (.txt) as held-out text, or none.",
    )
    p.add_argument(
        "--eval-data",
        metavar="DATA",
        help="Held-out data for accuracy and fidelity (default: --data).",
    )
    p.add_argument("--version", type=int, help="Version to optimize (default: the highest).")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of training and of inputs made without --data (default 0).",
    )
    p.add_argument(
        "--parallel",
        metavar="SPEC",
        help="How the processes torchrun started split the steps that train (finetune, "
        "distill, qat, retraining): dp=N (DDP, the default under torchrun), fsdp=N (sharded "
        "parameters, gradients and optimizer state), pp=N (pipeline stages, 1F1B), or "
        "dp=N,pp=M; the product must equal the process count, e.g. "
        "torchrun --nproc_per_node=2 -m slimserve optimize ... --parallel pp=2",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace variants of the same name.")
    p.add_argument("--threads", type=int, help="Threads for timing (default: the library's).")
    p.add_argument(
        "--embedding",
        action="store_true",
        help="Outputs are embeddings: report cosine similarity, not top-1 agreement.",
    )
    p.add_argument(
        "--max-eval-rows",
        type=int,
        default=2000,
        metavar="N",
        help="Rows of eval data used for accuracy and fidelity (default 2000).",
    )
    p.add_argument(
        "--batch-sizes",
        default="1,8,32,128",
        metavar="N,N,...",
        help="Batch sizes timed; the first is 'batch 1' (default 1,8,32,128).",
    )
    p.add_argument(
        "--min-time-s",
        type=float,
        default=0.2,
        metavar="S",
        help="Seconds of timed calls per batch size (default 0.2).",
    )
    p.add_argument(
        "--report-dir",
        type=Path,
        metavar="DIR",
        help="Where to write the report (default: NAME/reports/VERSION/).",
    )


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise InvalidArgument(f"--batch-sizes {text!r}: give positive integers, e.g. 1,8,32")
    return sizes


def _handle(args: argparse.Namespace) -> int:
    from slimserve.optimize.pipeline import Options, optimize
    from slimserve.train.distributed import init_distributed, shutdown
    from slimserve.train.parallel import parse_parallel

    spec = parse_parallel(args.parallel) if args.parallel else None
    # Under torchrun: join the group with this layout; otherwise a spec must be one process.
    ctx = init_distributed(parallel=spec)
    # Every Options field the command has a flag for; progress bars on rank 0 only.
    opts = build(Options, args, batch_sizes=_sizes(args.batch_sizes), progress=ctx.is_main)
    # On an error no shutdown(): its barrier would wait for ranks stuck in a collective;
    # the process exits and torchrun stops the others.
    result = optimize(args.repository, args.name, args.recipe, args.data, args.eval_data, opts)
    shutdown()
    if ctx.is_main:  # the other processes took part in training only
        _print(result)
    return 0


def _print(result: Any) -> None:
    for v in result.variants:
        p = v["profile"]
        if "perplexity" in p:  # a language model (lm_quant.py)
            print(
                f"{result.model}:{v['name']}: {p['weight_bytes']} weight bytes, perplexity "
                f"{p['perplexity']:.3f} (original {p['perplexity_original']:.3f}), "
                f"agreement {p['agreement']:.3f}"
            )
            continue
        accuracy = p.get("accuracy")
        shown = "not measured (no labelled data)" if accuracy is None else f"{accuracy:.4f}"
        print(
            f"{result.model}:{v['name']}: {p.get('size_bytes')} bytes, "
            f"p50 {p.get('latency_ms_batch1', 0):.3f} ms at batch 1, "
            f"accuracy {shown}, agreement {p.get('agreement')}"
        )
    print(f"report: {result.report.get('markdown')}")
