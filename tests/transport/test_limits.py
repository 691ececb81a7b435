"""Tensor limits alone: element counts, dimensions and BYTES element lengths."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.config import Settings
from slimserve.errors import InvalidArgument
from slimserve.transport.limits import MAX_EXTENT, TensorLimits, check_extent, check_inputs

LIMITS = TensorLimits(max_elements=12, max_string_bytes=4)


def test_inputs_at_the_limits_pass():
    check_inputs({"x": np.zeros((3, 4)), "s": np.array([b"abcd", b""], dtype=object)}, LIMITS)
    check_inputs({"scalar": np.float32(1.0).reshape(())}, LIMITS)


@pytest.mark.parametrize(
    "array",
    [np.zeros((13,)), np.zeros((2, 7)), np.zeros((0, 13)), np.zeros((0, 10**6), np.int8)],
)
def test_too_many_elements_or_a_huge_dimension(array):
    with pytest.raises(InvalidArgument, match="--max-tensor-elements"):
        check_inputs({"x": array}, LIMITS)


def test_a_long_string_is_refused_and_named():
    with pytest.raises(InvalidArgument, match="5 bytes, over the limit of 4") as info:
        check_inputs({"s": np.array([[b"ab"], [b"abcde"]], dtype=object)}, LIMITS)
    assert "'s'" in info.value.message and "--max-string-bytes" in info.value.message


def test_limits_come_from_settings():
    settings = Settings(max_tensor_elements=5, max_string_bytes=7)
    assert TensorLimits.from_settings(settings) == TensorLimits(5, 7)


def test_empty_shapes_numpy_cannot_hold_are_refused_before_decoding():
    check_extent((0, MAX_EXTENT), "x")
    check_extent((10**12, 10**12), "x")  # not empty: the decoders' size checks refuse it
    with pytest.raises(InvalidArgument, match="is empty"):
        check_extent((0, 869, 103015684, 103030688), "x")
