"""Sampling parameters from a request's loose values, one set of rules for every protocol.

The OpenAI routes (a JSON body) and the v2 protocol (request `parameters`, over HTTP JSON or
the gRPC parameters map) both call `sampling_params`; a wrong value is a `BadParameter`
(INVALID_ARGUMENT, HTTP 400) whose `param` names the field. The range checks themselves live in
`SamplingParams.__post_init__`; this module checks types and names the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from slimserve.errors import InvalidArgument
from slimserve.runtimes.llm import SamplingParams

_PARAM = re.compile(r"sampling parameter (\w+)=")  # the field named by SamplingParams' errors

# The request fields read here, and their defaults when absent (the OpenAI API's).
DEFAULTS: dict[str, Any] = {
    "max_tokens": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "n": 1,
    "stop": None,
    "seed": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "ignore_eos": False,  # an extension (vLLM's name): generate max_tokens, past end-of-sequence
    # Extensions with vLLM's names and meanings (the OpenAI API has none of them).
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


class BadParameter(InvalidArgument):
    """A request field is wrong; `param` names it (the OpenAI error body's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def sampling_params(
    values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, **extra: Any
) -> SamplingParams:
    """SamplingParams from `values` (absent or None: `defaults`, then DEFAULTS); `extra` are
    fields already checked by the caller (e.g. logprobs)."""

    def get(name: str) -> Any:
        value = values.get(name)
        if value is None and defaults is not None:
            value = defaults.get(name)
        return DEFAULTS[name] if value is None else value

    seed = get("seed")
    fields: dict[str, Any] = {
        "max_tokens": whole(get("max_tokens"), "max_tokens"),
        "temperature": number(get("temperature"), "temperature"),
        "top_p": number(get("top_p"), "top_p"),
        "n": whole(get("n"), "n"),
        "stop": stops(get("stop")),
        "seed": None if seed is None else whole(seed, "seed"),
        "presence_penalty": number(get("presence_penalty"), "presence_penalty"),
        "frequency_penalty": number(get("frequency_penalty"), "frequency_penalty"),
        "ignore_eos": boolean(get("ignore_eos"), "ignore_eos"),
        "top_k": whole(get("top_k"), "top_k"),
        "min_p": number(get("min_p"), "min_p"),
        "repetition_penalty": number(get("repetition_penalty"), "repetition_penalty"),
    }
    try:
        return SamplingParams(**fields, **extra)
    except InvalidArgument as exc:
        found = _PARAM.search(exc.message)
        raise BadParameter(exc.message, found.group(1) if found else None) from None


def whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadParameter(f"{name} must be an integer, got {value!r}", name)
    return value


def number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadParameter(f"{name} must be a number, got {value!r}", name)
    return float(value)


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadParameter(f"{name} must be true or false, got {value!r}", name)
    return value


def stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BadParameter("stop must be a string or a list of up to 4 strings", "stop")
