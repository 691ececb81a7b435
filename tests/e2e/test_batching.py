"""Dynamic batching through the real server: hundreds of distinct concurrent requests, over
HTTP (JSON and binary) and gRPC at once, each answered with exactly its own rows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.conftest import Repo, ServerProcess, mlp_reference


def _request(i: int) -> np.ndarray:
    rows = 1 + i % 3  # requests of 1, 2 and 3 rows share batches
    return (np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + i) / 100.0


def test_concurrent_requests_each_get_their_own_rows(server: ServerProcess, model_repo: Repo):
    http = httpclient.InferenceServerClient(server.http_url, concurrency=16)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)

    def grpc_call(i: int) -> np.ndarray:
        x = _request(i)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return grpc.infer("mlp", [inp], request_id=str(i)).as_numpy("logits")

    def http_send(i: int):  # tritonclient.http multiplexes on its own (gevent), not threads
        x = _request(i)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=i % 3 == 1)
        return http.async_infer("mlp", [inp], request_id=str(i))

    ids = range(300)
    with ThreadPoolExecutor(16) as pool:
        grpc_ids = [i for i in ids if i % 3 == 2]
        grpc_futures = [pool.submit(grpc_call, i) for i in grpc_ids]
        pending = [(i, http_send(i)) for i in ids if i % 3 != 2]
        results = [(i, p.get_result().as_numpy("logits")) for i, p in pending]
        results += [(i, f.result()) for i, f in zip(grpc_ids, grpc_futures, strict=True)]
    assert len(results) == 300
    weights = model_repo.weights["mlp/2"]
    for i, out in results:
        np.testing.assert_allclose(out, mlp_reference(weights, _request(i)), rtol=1e-5, atol=1e-5)
    stats = http.get_inference_statistics("mlp", "2")["model_stats"][0]
    assert stats["execution_count"] < stats["inference_count"]  # rows were batched together
