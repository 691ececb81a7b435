"""Per-request limits on decoded tensors, shared by the HTTP and gRPC transports.

The body-size limit (settings.max_body_bytes) already bounds memory; these bound what a
request may ask a model to do: how many elements one input holds and how long one BYTES
element (a string) may be. Both are checked right after decoding, before the engine sees the
request, and answered INVALID_ARGUMENT (HTTP 400) with the setting that raises them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimserve.config import Settings
from slimserve.errors import InvalidArgument

# numpy refuses (ValueError) to make even an empty array whose non-zero dimensions multiply
# past what memory could address; a shape with no zero is refused earlier by the decoders'
# size checks, so only empty shapes need this bound. No real tensor comes near it.
MAX_EXTENT = 1 << 48


def check_extent(shape: tuple[int, ...], name: str) -> None:
    """Refuse an empty shape numpy cannot represent, e.g. [0, 10**9, 10**9, 10**9]; the
    decoders call this before building the array."""
    if 0 not in shape:
        return
    extent = 1
    for d in shape:
        extent *= d or 1
    if extent > MAX_EXTENT:
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)[:8]} is empty (a 0 dimension) but its other "
            f"dimensions multiply to more than {MAX_EXTENT}; send the tensor's real shape"
        )


@dataclass(frozen=True, slots=True)
class TensorLimits:
    max_elements: int = 1 << 26  # elements in one input tensor (product of its shape)
    max_string_bytes: int = 4 * 1024 * 1024  # bytes in one BYTES element

    @classmethod
    def from_settings(cls, settings: Settings) -> TensorLimits:
        return cls(settings.max_tensor_elements, settings.max_string_bytes)


def check_inputs(inputs: Mapping[str, np.ndarray], limits: TensorLimits) -> None:
    """Refuse an input with too many elements, a dimension beyond the element limit (a
    zero-size tensor of shape [0, 10**18] says nothing good), or a BYTES element too long."""
    for name, array in inputs.items():
        _check_shape(name, array.shape, limits.max_elements)
        if array.dtype == object and array.size:
            _check_strings(name, array, limits.max_string_bytes)


def check_int_range(array: np.ndarray, target: np.dtype[Any], name: str) -> None:
    """Integers decoded in a wider type (JSON numbers, protobuf int32 for INT8) must fit the
    input's datatype: a 400 naming the input and the range, never a silent wrap-around."""
    if not array.size:
        return
    info = np.iinfo(target)
    low, high = int(array.min()), int(array.max())
    if low < info.min or high > info.max:
        raise InvalidArgument(
            f"input {name!r}: values {low}..{high} do not fit {target.name} "
            f"({info.min}..{info.max})"
        )


def _check_shape(name: str, shape: tuple[int, ...], limit: int) -> None:
    count = math.prod(shape)  # Python ints: no overflow, and 20x cheaper than np.prod
    if count > limit or any(d > limit for d in shape):
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)[:8]} holds {count} elements (or has a "
            f"dimension) over the limit of {limit}; send smaller tensors or raise "
            "--max-tensor-elements"
        )


def _check_strings(name: str, array: np.ndarray, limit: int) -> None:
    # One C-level pass over the lengths (BYTES elements are bytes objects).
    longest = max(map(len, array.reshape(-1)))
    if longest > limit:
        raise InvalidArgument(
            f"input {name!r}: a BYTES element has {longest} bytes, over the limit of {limit}; "
            "send shorter strings or raise --max-string-bytes"
        )
