"""`python -m slimserve.demo` (`make demo`): build a small repository, serve it, query it.

1. Builds `./demo-repo/` (skipping what already exists):
   * `fashion-mlp`: an MLP (784 -> 256 -> 10) trained for about a minute on Fashion-MNIST
     (scikit-learn's digits, upscaled to 28x28, when Fashion-MNIST is not installed),
     exported to ONNX and imported with `slimserve repo add`'s importer;
   * `minilm`: all-MiniLM-L6-v2, a sentence-embedding transformer shipped on PyPI;
   * `smollm2`: SmolLM2-135M-Instruct, a language model shipped on PyPI as GGUF, converted
     once to safetensors (`--no-llm` leaves it out).
2. Starts `python -m slimserve serve` on free loopback ports and waits until it is ready.
3. Sends real requests: images through `tritonclient.http` and `tritonclient.grpc`, three
   sentences through curl, two chats through the `openai` client (one streamed), and prints
   what came back.
4. Stops the server by its PID, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from slimserve.demo.clients import (
    SENTENCES,
    ask_curl,
    ask_grpc,
    ask_http,
    ask_openai,
    cosine,
    free_ports,
    running_server,
    show_predictions,
)
from slimserve.demo.data import (
    LLM_NAME,
    MINILM_NAME,
    Dataset,
    add_language_model,
    build_repository,
    load_dataset,
)
from slimserve.errors import SlimserveError

# --------------------------------------------------------------------------- main


def run(
    root: Path,
    train_seconds: float,
    images: int,
    install: bool,
    serve: bool = True,
    llm: bool = True,
) -> int:
    data = load_dataset(install)
    build_repository(root, train_seconds, data)
    if llm:
        add_language_model(root)
    if serve:
        query_server(root, data, images, llm)
    print("\ndemo done: the repository is in", root)
    return 0


def query_server(root: Path, data: Dataset, images: int, llm: bool = True) -> None:
    """Start the server on free ports, ask each model through a real client, stop it."""
    http_port, grpc_port = free_ports(2)
    picks = np.random.default_rng(1).choice(len(data.x_test), size=images, replace=False)
    with running_server(root, http_port, grpc_port):
        show_predictions(
            "tritonclient.http -> fashion-mlp", data, picks, ask_http(http_port, data, picks)
        )
        show_predictions(
            "tritonclient.grpc -> fashion-mlp", data, picks, ask_grpc(grpc_port, data, picks)
        )
        print(f"\ncurl -> {MINILM_NAME}")
        emb = ask_curl(http_port)  # (3, 384) sentence embeddings
        for other in (1, 2):
            print(
                f"  cosine similarity {cosine(emb[0], emb[other]):.3f}: "
                f"{SENTENCES[0]!r} vs {SENTENCES[other]!r}"
            )
        if llm and (root / LLM_NAME / "model.yaml").is_file():
            ask_openai(http_port)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures the demo reports in one line: server start, clients, files, slimserve."""
    from openai import OpenAIError
    from tritonclient.utils import InferenceServerException

    return (RuntimeError, OSError, SlimserveError, InferenceServerException, OpenAIError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slimserve.demo",
        description="Build a demo model repository, serve it, send it real requests.",
    )
    add = parser.add_argument
    add(
        "--repository",
        type=Path,
        default=Path("demo-repo"),
        help="Folder for the demo repository (default: ./demo-repo).",
    )
    add(
        "--train-seconds",
        type=float,
        default=60.0,
        help="Training time budget for the MLP in seconds (default: 60; at least one epoch).",
    )
    add(
        "--quick",
        action="store_true",
        help="Train for 3 seconds (at least one epoch): for tests and a fast look.",
    )
    add(
        "--images",
        type=int,
        default=8,
        help="Test images to classify through each client (default: 8).",
    )
    add(
        "--no-install",
        action="store_true",
        help="Do not apt-get Fashion-MNIST when missing; train on scikit-learn digits.",
    )
    add(
        "--no-llm",
        action="store_true",
        help="Leave out the language model (SmolLM2-135M-Instruct, ~540 MB converted).",
    )
    add(
        "--build-only",
        action="store_true",
        help="Build the repository and stop: no server, no requests.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seconds = 3.0 if args.quick else args.train_seconds
    # Lines appear as they happen even when the output is piped (make, CI logs).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never downloads from a hub
    root = args.repository.resolve()
    try:
        return run(
            root, seconds, args.images, not args.no_install, not args.build_only, not args.no_llm
        )
    except KeyboardInterrupt:
        print("\ninterrupted (no server left running)")
        return 130
    except _expected_errors() as exc:
        message = exc.message if isinstance(exc, SlimserveError) else str(exc)
        print(f"\ndemo failed: {message}", file=sys.stderr)
        return 1
