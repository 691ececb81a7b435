"""The demo's server process and clients: `python -m slimserve serve` as a child process on
free ports, stopped by its PID; tritonclient over HTTP and gRPC; curl for an embedding."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from slimserve.bench.local_server import free_ports as free_ports  # tests import it here
from slimserve.bench.local_server import serve_command, spawn, stop, wait_ready
from slimserve.demo.data import LLM_NAME, MINILM_NAME, MLP_NAME, Dataset

SENTENCES = (
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The central bank raised interest rates again.",
)
READY_TIMEOUT_S = 180.0  # the models load in seconds, but 2 busy cores can be slow
QUESTION = "What is the capital of France?"
COUNTING = "Count from one to five."

# --------------------------------------------------------------------------- server


@contextmanager
def running_server(root: Path, http_port: int, grpc_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m slimserve serve` as a child process, stopped by its PID on the way out."""
    cmd = serve_command(root, http_port, grpc_port)
    print("$ python " + " ".join(cmd[1:]))
    with tempfile.TemporaryDirectory(prefix="slimserve-demo-") as tmp:
        log_path = Path(tmp) / "server.log"  # shown if the server fails to start
        proc = spawn(cmd, log_path)
        try:
            url = f"http://127.0.0.1:{http_port}/v2/health/ready"
            wait_ready(proc, url, log_path, READY_TIMEOUT_S)
            print(f"server ready (pid {proc.pid}) on http://127.0.0.1:{http_port}")
            yield proc
        finally:
            stop(proc)
            print(f"server stopped (pid {proc.pid})")


# --------------------------------------------------------------------------- clients


def ask_http(port: int, data: Dataset, picks: np.ndarray) -> np.ndarray:
    """Classify images with tritonclient.http; returns the predicted classes."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        meta = client.get_model_metadata(MLP_NAME)
        print(f"model metadata: inputs {meta['inputs']}, outputs {meta['outputs']}")
        x = data.x_test[picks]
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = [httpclient.InferRequestedOutput("logits", binary_data=True)]
        result = client.infer(MLP_NAME, [inp], outputs=out)
        predicted: np.ndarray = np.asarray(result.as_numpy("logits")).argmax(1)
        return predicted
    finally:
        client.close()


def ask_grpc(port: int, data: Dataset, picks: np.ndarray) -> np.ndarray:
    """Classify images with tritonclient.grpc; returns the predicted classes."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        x = data.x_test[picks]
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(MLP_NAME, [inp], outputs=[grpcclient.InferRequestedOutput("logits")])
        predicted: np.ndarray = np.asarray(result.as_numpy("logits")).argmax(1)
        return predicted
    finally:
        client.close()


def ask_curl(port: int) -> np.ndarray:
    """Embed SENTENCES with a plain JSON request through curl; returns (3, 384) float32."""
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [len(SENTENCES)],
                    "data": list(SENTENCES),
                }
            ]
        }
    )
    url = f"http://127.0.0.1:{port}/v2/models/{MINILM_NAME}/infer"
    print(f"$ curl -s {url} -H 'Content-Type: application/json' -d '{body}'")
    if shutil.which("curl"):
        cmd = [
            "curl",
            "-s",
            "--fail-with-body",
            url,
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"curl failed ({done.returncode}): {done.stdout}{done.stderr}")
        reply = json.loads(done.stdout)
    else:  # no curl binary: the same request from Python
        print("(curl is not installed; sending the same request with urllib)")
        req = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.loads(resp.read())
    out = reply["outputs"][0]
    print(
        f"-> {out['name']} {out['datatype']} shape {out['shape']}: "
        f"[{', '.join(f'{v:.3f}' for v in out['data'][:4])}, ...]"
    )
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def ask_openai(port: int) -> tuple[str, str]:
    """Chat with the language model through the `openai` client: one answer whole, one
    streamed as server-sent events (printed as the tokens come); returns both texts."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        print(f"\nopenai -> {LLM_NAME}: chat.completions, temperature 0")
        print(f"  user: {QUESTION}")
        reply = client.chat.completions.create(
            model=LLM_NAME,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=24,
            temperature=0,
        )
        answer = reply.choices[0].message.content or ""
        usage = reply.usage
        print(f"  {LLM_NAME}: {answer.strip()}")
        if usage is not None:
            print(f"  ({usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens)")
        print(f"  user: {COUNTING}  (stream=True)")
        print(f"  {LLM_NAME}: ", end="", flush=True)
        pieces = []
        stream = client.chat.completions.create(
            model=LLM_NAME,
            messages=[{"role": "user", "content": COUNTING}],
            max_tokens=32,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                print(pieces[-1].replace("\n", "\n    "), end="", flush=True)
        print(f"\n  ({len(pieces)} streamed chunks)")
        return answer, "".join(pieces)
    finally:
        client.close()


def show_predictions(title: str, data: Dataset, picks: np.ndarray, predicted: np.ndarray) -> int:
    """Print image / label / prediction rows; returns how many were right."""
    print(f"\n{title}")
    right = 0
    for idx, pred in zip(picks, predicted, strict=True):
        label = int(data.y_test[idx])
        ok = int(pred) == label
        right += ok
        print(
            f"  test image {idx:5d}: label {data.classes[label]:<12} "
            f"predicted {data.classes[int(pred)]:<12} {'ok' if ok else 'WRONG'}"
        )
    print(f"  {right}/{len(picks)} right")
    return right


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
