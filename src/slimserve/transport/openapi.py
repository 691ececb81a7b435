"""The OpenAPI 3.1 description of the v2 HTTP API, served at GET /v2/openapi.json.

Written by hand from the routes in `transport.http` and the documents the engine returns, and
held to them by schemathesis (tests/e2e/test_fuzz.py): every status a route can answer is
listed, and every body is described as sent. It needs no API key: it describes the public
protocol, not this deployment (no model names, no settings), like the KServe specification.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from slimserve import __version__
from slimserve.types import DATATYPES

JSON = "application/json"
BINARY = "application/octet-stream"
Schema = dict[str, Any]

_REASONS = {
    400: "Bad request: malformed body, invalid name, over a tensor limit",
    401: "Missing or unknown API key (servers started with --api-keys-file)",
    403: "The key lacks the scope or the model; or model control is off",
    404: "No such model, version or variant",
    409: "Conflict with the repository's state",
    413: "Body over --max-body-bytes",
    429: "Over the client's rate limit (Retry-After says when to retry)",
    501: "A protocol feature slimserve does not implement",
    503: "Not ready, or the model's queue is full",
    504: "The request's deadline (parameters.timeout) passed",
}
_READ = (400, 401, 403, 404)
_INFER = (400, 401, 403, 404, 413, 429, 501, 503, 504)
_MANAGE = (400, 401, 403, 404, 409, 413, 501, 503)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


_STR, _BOOL, _INT = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
_PARAMETERS: Schema = {
    "type": "object",
    "description": "Free-form parameters; `timeout` (int: microseconds, float: seconds), "
    "`binary_data_output`, `variant` and others as in the KServe v2 protocol.",
}
_SHAPE = _array({"type": "integer", "minimum": 0}, maxItems=32)
_DATATYPE = {"type": "string", "enum": list(DATATYPES)}

SCHEMAS: dict[str, Schema] = {
    "Error": _obj(["error"], error=_STR),
    "ServerMetadata": _obj(
        ["name", "version", "extensions"], name=_STR, version=_STR, extensions=_array(_STR)
    ),
    "Live": _obj(["live"], live=_BOOL),
    "Ready": _obj(["ready"], ready=_BOOL),
    "ModelReady": _obj(["name", "ready"], name=_STR, ready=_BOOL),
    "TensorMetadata": _obj(
        ["name", "datatype", "shape"], name=_STR, datatype=_STR, shape=_array(_INT)
    ),
    "ModelMetadata": _obj(
        ["name", "versions", "platform", "inputs", "outputs", "state"],
        name=_STR,
        versions=_array(_STR),
        platform=_STR,
        state=_STR,
        reason=_STR,
        inputs=_array(_ref("TensorMetadata")),
        outputs=_array(_ref("TensorMetadata")),
        variants=_array(_STR),
    ),
    "ModelConfig": _obj(
        ["name"],
        name=_STR,
        platform=_STR,
        backend=_STR,
        max_batch_size=_INT,
        input=_array({"type": "object"}),
        output=_array({"type": "object"}),
    ),
    "HealthStatus": _obj(
        ["status", "live", "ready"],
        status={"type": "string", "enum": ["ok", "degraded", "starting", "stopping"]},
        live=_BOOL,
        ready=_BOOL,
        breakers_open=_array(_STR),
        failed_units=_array(_STR),
        degraded_models=_array(_STR),
        resident_bytes=_INT,
        memory_budget_bytes=_INT,
    ),
    "Statistics": _obj(
        ["model_stats"],
        model_stats=_array(
            _obj(
                ["name", "version"],
                name=_STR,
                version=_STR,
                inference_count=_INT,
                execution_count=_INT,
                inference_stats={"type": "object"},
            )
        ),
    ),
    "IndexRequest": {"type": "object", "properties": {"ready": _BOOL}},
    "Index": _array(
        _obj(
            ["name", "version", "state", "reason"], name=_STR, version=_STR, state=_STR, reason=_STR
        )
    ),
    "LoadRequest": {"type": "object", "properties": {"parameters": {"type": "object"}}},
    "Empty": {"type": "object", "maxProperties": 0},
    "RequestInput": _obj(
        ["name", "shape", "datatype"],
        name=_STR,
        shape=_SHAPE,
        datatype=_DATATYPE,
        parameters=_PARAMETERS,
        data={
            "type": "array",
            "description": "Row-major values, flat or nested; absent "
            "when parameters.binary_data_size says the tensor follows the JSON header.",
        },
    ),
    "RequestOutput": _obj(["name"], name=_STR, parameters=_PARAMETERS),
    "InferenceRequest": _obj(
        ["inputs"],
        id=_STR,
        parameters=_PARAMETERS,
        inputs=_array(_ref("RequestInput"), minItems=1),
        outputs=_array(_ref("RequestOutput")),
    ),
    "ResponseOutput": _obj(
        ["name", "datatype", "shape"],
        name=_STR,
        datatype=_DATATYPE,
        shape=_array(_INT),
        parameters={"type": "object"},
        data={"type": "array"},
    ),
    "InferenceResponse": _obj(
        ["model_name", "model_version", "outputs"],
        model_name=_STR,
        model_version=_STR,
        id=_STR,
        parameters={"type": "object"},
        outputs=_array(_ref("ResponseOutput")),
    ),
}


def _json_response(schema: str, description: str = "OK") -> Schema:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}


def _responses(ok: Schema, errors: tuple[int, ...]) -> Schema:
    out: Schema = {"200": ok}
    for status in errors:
        out[str(status)] = _json_response("Error", _REASONS[status])
    return out


def _path_param(name: str, example: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": _STR, "example": example}


_MODEL, _VERSION = _path_param("model", "mlp"), _path_param("version", "1")
_HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "Binary tensor extension: bytes of JSON before the raw tensors.",
    "schema": {"type": "integer", "minimum": 0},
}
_BODY_INFER = {
    "required": True,
    "content": {
        JSON: {
            "schema": _ref("InferenceRequest"),
            "example": {
                "inputs": [
                    {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                ]
            },
        },
        BINARY: {"schema": {"type": "string", "format": "binary"}},
    },
}
_INFER_OK = {
    "description": "Outputs as JSON, or a JSON header and raw tensors (binary outputs)",
    "headers": {"Inference-Header-Content-Length": {"schema": _INT}},
    "content": {
        JSON: {"schema": _ref("InferenceResponse")},
        BINARY: {"schema": {"type": "string", "format": "binary"}},
    },
}


def _get(op_id: str, ok: Schema, errors: tuple[int, ...], params: list[Schema]) -> Schema:
    return {
        "get": {"operationId": op_id, "parameters": params, "responses": _responses(ok, errors)}
    }


def _model_paths(prefix: str, params: list[Schema], tag: str) -> dict[str, Schema]:
    ready = _responses(_json_response("ModelReady"), _READ)
    ready["503"] = _json_response("ModelReady", "The model (version) is not ready")
    return {
        prefix: _get(f"model_metadata{tag}", _json_response("ModelMetadata"), _READ, params),
        f"{prefix}/ready": {
            "get": {"operationId": f"model_ready{tag}", "parameters": params, "responses": ready}
        },
        f"{prefix}/config": _get(
            f"model_config{tag}", _json_response("ModelConfig"), _READ, params
        ),
        f"{prefix}/stats": _get(f"model_stats{tag}", _json_response("Statistics"), _READ, params),
        f"{prefix}/infer": {
            "post": {
                "operationId": f"infer{tag}",
                "parameters": [*params, _HEADER_LENGTH],
                "requestBody": _BODY_INFER,
                "responses": _responses(_INFER_OK, _INFER),
            }
        },
    }


def _health(which: str) -> Schema:
    schema = which.capitalize()
    return {
        "get": {
            "operationId": f"health_{which}",
            "responses": {
                "200": _json_response(schema),
                "503": _json_response(schema, f"Not {which}"),
            },
        }
    }


def _manage(action: str) -> Schema:
    body = {"required": False, "content": {JSON: {"schema": _ref("LoadRequest")}}}
    return {
        "post": {
            "operationId": f"repository_{action}",
            "parameters": [_MODEL],
            "requestBody": body,
            "responses": _responses(_json_response("Empty"), _MANAGE),
        }
    }


def build_openapi() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict)."""
    index_body = {"required": False, "content": {JSON: {"schema": _ref("IndexRequest")}}}
    paths: dict[str, Schema] = {
        "/v2": _get("server_metadata", _json_response("ServerMetadata"), (401, 403), []),
        "/v2/openapi.json": {
            "get": {
                "operationId": "openapi",
                "responses": {
                    "200": {
                        "description": "This document",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/v2/health/live": _health("live"),
        "/v2/health/ready": _health("ready"),
        "/v2/health/status": _get("health_status", _json_response("HealthStatus"), (401, 403), []),
        "/v2/models/stats": _get("all_stats", _json_response("Statistics"), (401, 403), []),
        **_model_paths("/v2/models/{model}", [_MODEL], ""),
        **_model_paths("/v2/models/{model}/versions/{version}", [_MODEL, _VERSION], "_version"),
        "/v2/repository/index": {
            "post": {
                "operationId": "repository_index",
                "requestBody": index_body,
                "responses": _responses(_json_response("Index"), (400, 401, 403, 413)),
            }
        },
        "/v2/repository/models/{model}/load": _manage("load"),
        "/v2/repository/models/{model}/unload": _manage("unload"),
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "responses": _responses(
                    {
                        "description": "Prometheus text exposition",
                        "content": {"text/plain": {"schema": _STR}},
                    },
                    (401, 403),
                ),
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "slimserve KServe v2 HTTP API",
            "version": __version__,
            "description": "KServe Open Inference Protocol v2 with Triton's extensions "
            "(binary tensors, model config, statistics, repository).",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],  # a key is needed only with --api-keys-file
        "paths": paths,
    }


@cache
def openapi_bytes() -> bytes:
    """The document as JSON bytes, built once."""
    return orjson.dumps(build_openapi())
