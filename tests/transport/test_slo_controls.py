"""latency_slo_ms / max_quality_loss become typed controls, parsed once; bad values say why."""

from __future__ import annotations

import pytest

from slimserve.errors import InvalidArgument
from slimserve.transport.controls import take_controls


@pytest.mark.parametrize(
    ("params", "slo", "loss"),
    [
        ({"latency_slo_ms": 5}, 5.0, None),
        ({"latency_slo_ms": 2.5, "max_quality_loss": 1}, 2.5, 1.0),
        ({"latency_slo_ms": "7", "max_quality_loss": "0.5"}, 7.0, 0.5),  # gRPC string params
    ],
)
def test_objective_is_parsed_once_and_removed_from_parameters(params, slo, loss):
    params = {**params, "temperature": 0.1}
    _, controls = take_controls(params)
    assert (controls.latency_slo_ms, controls.max_quality_loss) == (slo, loss)
    assert params == {"temperature": 0.1}  # the model's own parameters only


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"latency_slo_ms": 0}, "'latency_slo_ms' = 0: give the latency objective in millis"),
        ({"latency_slo_ms": True}, "'latency_slo_ms' = True"),
        ({"latency_slo_ms": float("inf")}, "'latency_slo_ms' = inf"),
        ({"latency_slo_ms": 5, "max_quality_loss": -1}, "'max_quality_loss' = -1: give the poi"),
        ({"max_quality_loss": 1}, "'max_quality_loss' needs 'latency_slo_ms'"),
    ],
)
def test_bad_objectives_name_the_parameter_and_the_fix(params, message):
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        take_controls(params)


def test_without_an_objective_nothing_changes():
    _, controls = take_controls({"priority": 3})
    assert controls.latency_slo_ms is None and controls.max_quality_loss is None
