"""The one set of rules for sampling parameters from loose request values (OpenAI and v2)."""

from __future__ import annotations

import pytest

from slimserve.runtimes.llm import SamplingParams
from slimserve.serving.sampling_args import BadParameter, sampling_params


def test_defaults_then_the_caller_s_defaults_then_the_request() -> None:
    assert sampling_params({}) == SamplingParams()
    model = {"max_tokens": 6, "temperature": 0.0}
    assert sampling_params({}, model) == SamplingParams(max_tokens=6, temperature=0.0)
    asked = sampling_params({"max_tokens": 3, "temperature": None, "stop": "."}, model)
    assert asked == SamplingParams(max_tokens=3, temperature=0.0, stop=(".",))
    assert sampling_params({"stop": ["a", "b"], "seed": 7}).stop == ("a", "b")
    assert sampling_params({"temperature": 1}).temperature == 1.0  # an int is a number
    assert sampling_params({}, logprobs=2).logprobs == 2
    assert sampling_params({}).ignore_eos is False
    assert sampling_params({"ignore_eos": True}).ignore_eos is True
    assert sampling_params({"ignore_eos": None}, {"ignore_eos": True}).ignore_eos is True
    extra = sampling_params({"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    assert (extra.top_k, extra.min_p, extra.repetition_penalty) == (40, 0.05, 1.1)


@pytest.mark.parametrize(
    ("values", "param"),
    [
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 17}, "n"),
        ({"stop": [1]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"seed": 1.0}, "seed"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"ignore_eos": "true"}, "ignore_eos"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": "x"}, "repetition_penalty"),
    ],
)
def test_a_bad_value_names_its_field(values: dict[str, object], param: str) -> None:
    with pytest.raises(BadParameter) as bad:
        sampling_params(values)
    assert bad.value.param == param and param in bad.value.message
