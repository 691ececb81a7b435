"""The ceiling of grpc.aio on this machine: a v2 gRPC server that does nothing.

It answers every ModelInfer with the same pre-serialized response (ten FP32 zeros), on grpc.aio
and uvloop as slimserve does, with no parsing, no model and no batching. What `slimserve bench`
measures against it is what grpcio itself costs per call with this client on these cores: no
server built on grpcio can answer faster.

    python benchmarks/grpc_echo.py --port 18502 &
    slimserve bench --grpc-url 127.0.0.1:18502 --protocol grpc --model mlp-onnx \
        --concurrency 64 --input-file mlp_request.json
"""

from __future__ import annotations

import argparse

import grpc
import numpy as np
import uvloop

from slimserve.transport.vendor import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


def _answer(model: str) -> bytes:
    output = pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32", shape=[1, 10])
    raw = np.zeros(10, np.float32).tobytes()
    return pb.ModelInferResponse(
        model_name=model, outputs=[output], raw_output_contents=[raw]
    ).SerializeToString()


async def serve(port: int, model: str) -> None:
    answer = _answer(model)

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}  # bytes in, bytes out
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=18502)
    parser.add_argument("--model", default="mlp-onnx")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.model))


if __name__ == "__main__":
    main()
