"""ONNX Runtime backend: one InferenceSession on the CPU execution provider.

Artifact: `model.onnx`, or the only `*.onnx` file, in the version (or variant) folder. Weights
stored as ONNX external data must lie inside that folder.

Options: `RuntimeOptions.intra_op_threads` (0: ONNX Runtime's default, one per core) and
`RuntimeOptions.graph_optimization` (disable | basic | extended | all).
model.yaml `parameters` (optional):
  inter_op_threads: int   threads across independent graph nodes (default 1: sequential)
  allow_spinning: bool    let idle intra-op threads spin; default: the server's --spin-wait
                          (off: they sleep and leave the cores to the server's other threads)

`memory_bytes` is the bytes of the graph's initializers (the weights), counted from the model
file when loaded; ONNX Runtime's arena for activations is not included (it grows with the
batch and is shared in the process).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from slimserve.errors import ConfigError, ModelLoadError, UnsafeArtifact
from slimserve.repository.store import Target
from slimserve.runtimes._common import check_folder, find_artifact, not_loaded
from slimserve.runtimes.base import Runtime, RuntimeOptions
from slimserve.security.crypto import is_encrypted, read_artifact
from slimserve.security.paths import safe_join
from slimserve.types import TensorSpec

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# ONNX Runtime's type strings -> KServe v2 datatypes.
_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(double)": "FP64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}

_FIX_MISSING = "export the model to ONNX (torch.onnx.export) and save it as model.onnx here"


class OnnxRuntime(Runtime):
    """Runs an ONNX graph with ONNX Runtime."""

    def __init__(self, target: Target, options: RuntimeOptions | None = None) -> None:
        super().__init__(target, options)
        self._session: ort.InferenceSession | None = None
        self._output_names: list[str] = [s.name for s in self.outputs]
        self._weight_bytes = 0

    def load(self) -> None:
        folder = check_folder(self.target)
        path = find_artifact(folder, "model.onnx", _FIX_MISSING)
        # An encrypted model is decrypted in memory and handed to ONNX Runtime as bytes.
        source: str | bytes = str(path)
        if is_encrypted(path):
            source = _decrypt_model(path, folder, self.options.data_key)
        self._weight_bytes = _inspect_model(path, source)
        session = self._open(path, source)
        batch = self.target.config.batching.max_batch_size
        _check_io(path, "input", self.inputs, session.get_inputs(), batch, all_needed=True)
        _check_io(path, "output", self.outputs, session.get_outputs(), batch, all_needed=False)
        self._session = session

    def _open(self, path: Path, source: str | bytes) -> ort.InferenceSession:
        options = self._session_options()
        try:
            return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {exc}") from None

    def _session_options(self) -> ort.SessionOptions:
        params = self.target.config.parameters
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.options.intra_op_threads
        inter_op = params.get("inter_op_threads", 1)
        if not isinstance(inter_op, int) or inter_op < 0:
            raise ConfigError(
                f"{self.target.path}: parameters.inter_op_threads = {inter_op!r}; "
                "fix: a non-negative integer (1: run graph nodes one after another)"
            )
        opts.inter_op_num_threads = inter_op
        opts.graph_optimization_level = _LEVELS[self.options.graph_optimization]
        # The model's own parameter wins over the server's --spin-wait.
        spin = "1" if params.get("allow_spinning", self.options.spin_wait) else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        return opts

    @property
    def session(self) -> ort.InferenceSession | None:
        """The loaded session (None when not loaded), e.g. to read its options or profile it."""
        return self._session

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise not_loaded(self.target)
        results = session.run(self._output_names, {k: _feed(v) for k, v in inputs.items()})
        return dict(zip(self._output_names, results, strict=True))

    def unload(self) -> None:
        self._session = None

    def memory_bytes(self) -> int:
        return self._weight_bytes if self._session is not None else 0


def _feed(array: np.ndarray) -> np.ndarray:
    """ONNX Runtime takes strings as str: it would turn b"a" into "b'a'" (BYTES are bytes)."""
    if array.dtype != object:
        return array
    decode = np.frompyfunc(lambda x: x.decode("utf-8") if isinstance(x, bytes) else x, 1, 1)
    decoded: np.ndarray = decode(array).astype(object)
    return decoded


def _inspect_model(path: Path, source: str | bytes) -> int:
    """Check external data stays in the folder; return the weights' size in bytes."""
    try:
        if isinstance(source, bytes):
            model = onnx.load_model_from_string(source)
        else:
            model = onnx.load(source, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have no common type
        raise ModelLoadError(f"{path}: not a valid ONNX model: {exc}") from None
    folder = path.parent.resolve()
    total = 0
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(path, folder, tensor)
        total += _tensor_bytes(tensor)
    # A graph without initializers (all weights computed) still holds its file in memory.
    return total or (len(source) if isinstance(source, bytes) else path.stat().st_size)


def _decrypt_model(path: Path, folder: Path, key: bytes | None) -> bytes:
    """The clear model bytes of `path.enc`, with any external data decrypted and inlined.

    ONNX Runtime reads external data from files beside a model path, and a model given as
    bytes has no path: each external tensor's bytes are copied into the graph instead (so
    the model must fit protobuf's 2 GiB limit).
    """
    data = read_artifact(path, key, root=folder)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have no common type
        raise ModelLoadError(f"{path}: not a valid ONNX model: {exc}") from None
    external = [t for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return data
    files: dict[str, bytes] = {}
    for tensor in external:
        _inline_external(path, folder, tensor, files, key)
    return bytes(model.SerializeToString())


def _inline_external(
    path: Path, folder: Path, tensor: onnx.TensorProto, files: dict[str, bytes], key: bytes | None
) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    try:
        safe_join(folder, location, f"external data location of '{tensor.name}'")
    except UnsafeArtifact as exc:
        raise UnsafeArtifact(f"{path}: {exc.message}") from None
    if location not in files:
        files[location] = read_artifact(folder / location, key, root=folder)
    offset = int(entries.get("offset", 0))
    length = int(entries.get("length", len(files[location]) - offset))
    tensor.raw_data = files[location][offset : offset + length]
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and constant tensor of a graph and of its sub-graphs (If, Loop)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _check_external(path: Path, folder: Path, tensor: onnx.TensorProto) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    resolved = (folder / location).resolve()
    if not location or folder not in resolved.parents:
        raise UnsafeArtifact(
            f"{path}: initializer '{tensor.name}' keeps its data at {location!r}, outside the "
            f"model folder; fix: save the external data next to the model "
            "(onnx.save_model(..., save_as_external_data=True, location='model.onnx.data'))"
        )
    if not resolved.is_file():
        raise ModelLoadError(f"{path}: external data file {resolved} is missing")


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of one tensor's data: its element count times its element size."""
    entries = {e.key: e.value for e in tensor.external_data}
    if "length" in entries:
        return int(entries["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 4  # an exotic type (float8, int4): close enough for an estimate
    return int(math.prod(tensor.dims)) * itemsize


def _check_io(
    path: Path,
    kind: str,
    declared: list[TensorSpec],
    graph: list[Any],
    max_batch: int,
    *,
    all_needed: bool,
) -> None:
    """model.yaml's inputs/outputs must exist in the graph with the same datatype and rank.

    Every graph input must be declared too (ONNX Runtime needs a value for each); graph
    outputs may be left undeclared (not served).
    """
    found = {node.name: node for node in graph}
    for spec in declared:
        node = found.get(spec.name)
        if node is None:
            raise ModelLoadError(
                f"{path}: model.yaml declares {kind} '{spec.name}', which the graph does not "
                f"have; the graph's {kind}s are {sorted(found)}; fix: rename it in model.yaml"
            )
        _check_node(path, kind, spec, node)
        _check_batch_dim(path, kind, spec, node, max_batch)
    missing = sorted(set(found) - {s.name for s in declared})
    if all_needed and missing:
        raise ModelLoadError(
            f"{path}: the graph needs {kind}s {missing}, which model.yaml does not declare; "
            "fix: add them to model.yaml's inputs"
        )


def _check_node(path: Path, kind: str, spec: TensorSpec, node: Any) -> None:
    datatype = _ORT_TYPES.get(node.type, node.type)
    if datatype != spec.datatype:
        raise ModelLoadError(
            f"{path}: {kind} '{spec.name}' is {datatype} in the graph but {spec.datatype} in "
            f"model.yaml; fix: set datatype: {datatype} in model.yaml"
        )
    shape = node.shape or []  # [] also when the graph does not know the rank: not checked
    bad_rank = bool(shape) and len(shape) != len(spec.shape)
    fixed = zip(shape, spec.shape, strict=False)
    bad_dim = any(isinstance(g, int) and d != -1 and g != d for g, d in fixed)
    if bad_rank or bad_dim:
        graph_shape = [g if isinstance(g, int) else -1 for g in shape]
        raise ModelLoadError(
            f"{path}: {kind} '{spec.name}' has shape {graph_shape} in the graph but "
            f"{list(spec.shape)} in model.yaml; fix: set shape: {graph_shape} in model.yaml"
        )


def _check_batch_dim(path: Path, kind: str, spec: TensorSpec, node: Any, max_batch: int) -> None:
    """A batched model's graph must accept batches up to max_batch_size in its first dim."""
    first = node.shape[0] if node.shape else None
    if max_batch > 0 and isinstance(first, int) and first < max_batch:
        raise ModelLoadError(
            f"{path}: {kind} '{spec.name}' has a fixed first dimension {first} in the graph, "
            f"but batching.max_batch_size is {max_batch}; fix: export with a dynamic batch "
            f"dimension (dynamic_axes / dynamic_shapes), or set max_batch_size: {first}"
        )
