"""The baseline: the plain FastAPI + uvicorn endpoint any Python user writes in ten lines.

It accepts the same v2 JSON body as slimserve and calls the ONNX model once per request
(no batching), in FastAPI's thread pool (a `def` endpoint, as FastAPI's docs advise for
blocking calls). Run with one uvicorn worker:

    MODEL=/tmp/bench-ws/repo/mlp-onnx/1/model.onnx \
        uvicorn benchmarks.baseline_fastapi:app --port 8000 --workers 1
"""

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI

# ---- the ten lines a user writes -------------------------------------------------------
app = FastAPI()
session = ort.InferenceSession(os.environ["MODEL"], providers=["CPUExecutionProvider"])


@app.post("/v2/models/{name}/infer")
def infer(name: str, body: dict) -> dict:
    inp = body["inputs"][0]
    x = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
    y = session.run(None, {session.get_inputs()[0].name: x})[0]
    out = {"name": "logits", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}
    return {"model_name": name, "outputs": [out]}


# -----------------------------------------------------------------------------------------


@app.get("/v2/health/ready")
def ready() -> dict:  # for the benchmark's start-up probe only
    return {"ready": True}
