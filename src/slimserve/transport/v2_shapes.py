"""The KServe v2 (and Triton) shapes of the engine's typed answers, as JSON documents.

The HTTP codec sends these as they are; the gRPC codec builds the same fields into protobuf
messages. Keys follow the protocol: metadata tensors carry full shapes (-1: a free
dimension), Triton's model config carries `dims` without the batch dimension and datatypes
spelled `TYPE_FP32` (`TYPE_STRING` for BYTES).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slimserve import types


def triton_type(datatype: str) -> str:
    """A v2 datatype as Triton's model config names it: FP32 -> TYPE_FP32."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def config_dims(spec: types.TensorSpec, batched: bool) -> list[int]:
    """Triton's `dims`: the shape without the batch dimension of a batched model."""
    return list(spec.shape[1:] if batched else spec.shape)


def server_metadata_doc(meta: types.ServerMetadata) -> dict[str, Any]:
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


def model_metadata_doc(meta: types.ModelMetadata) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [s.to_dict() for s in meta.inputs],
        "outputs": [s.to_dict() for s in meta.outputs],
        "state": meta.state,
    }
    if meta.reason:
        doc["reason"] = meta.reason
    if meta.variants:
        doc["variants"] = list(meta.variants)
    return doc


def model_config_doc(config: types.ModelSettings) -> dict[str, Any]:
    def tensors(specs: Sequence[types.TensorSpec]) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "data_type": triton_type(s.datatype),
                "dims": config_dims(s, config.batched),
            }
            for s in specs
        ]

    doc: dict[str, Any] = {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": tensors(config.inputs),
        "output": tensors(config.outputs),
    }
    if config.batched:
        doc["dynamic_batching"] = {"max_queue_delay_microseconds": config.max_queue_delay_us}
    return doc


def _pair(d: types.Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


_NONE = types.Duration(0, 0)


def unit_statistics_doc(s: types.ModelStatistics) -> dict[str, Any]:
    """Triton's statistics of one unit (input and output copies are not timed: zero)."""
    no_copy = types.Duration(s.compute.count, 0)
    return {
        "name": s.name,
        "version": s.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _pair(s.success),
            "fail": _pair(s.fail),
            "queue": _pair(s.queue),
            "compute_input": _pair(no_copy),
            "compute_infer": _pair(s.compute),
            "compute_output": _pair(no_copy),
            "cache_hit": _pair(_NONE),
            "cache_miss": _pair(_NONE),
        },
        "batch_stats": [
            {
                "batch_size": b.batch_size,
                "compute_input": _pair(types.Duration(b.executions.count, 0)),
                "compute_infer": _pair(b.executions),
                "compute_output": _pair(types.Duration(b.executions.count, 0)),
            }
            for b in s.batches
        ],
    }


def statistics_doc(stats: Sequence[types.ModelStatistics]) -> dict[str, Any]:
    return {"model_stats": [unit_statistics_doc(s) for s in stats]}


def index_doc(rows: Sequence[types.RepositoryEntry]) -> list[dict[str, Any]]:
    return [
        {"name": r.name, "version": r.version, "state": r.state, "reason": r.reason} for r in rows
    ]


def health_doc(report: types.HealthReport) -> dict[str, Any]:
    return {
        "status": report.status,
        "live": report.live,
        "ready": report.ready,
        "breakers_open": list(report.breakers_open),
        "failed_units": list(report.failed_units),
        "degraded_models": list(report.degraded_models),
        "resident_bytes": report.resident_bytes,
        "memory_budget_bytes": report.memory_budget_bytes,
    }
