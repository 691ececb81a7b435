"""OpenAI request bodies to what the engine takes: SamplingParams, prompts, messages, texts.

Pure functions over the parsed JSON body; every mistake is a 400 (`BadRequest`) that names
the field in the error's `param`.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from slimserve.errors import DeadlineExceeded
from slimserve.serving.llm import SamplingParams
from slimserve.serving.sampling_args import BadParameter, number, sampling_params, whole

_UNSUPPORTED = ("suffix", "logit_bias", "functions", "function_call", "audio", "prediction")
_SAMPLING = (
    *("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop"),
    *("seed", "presence_penalty", "frequency_penalty", "logprobs", "user", "timeout"),
    *("ignore_eos", "top_k", "min_p", "repetition_penalty", "response_format", "logit_bias"),
    # The per-request objective extension (as the v2 parameters of the same names).
    *("latency_slo_ms", "max_quality_loss"),
)
# Every field each route reads; any other is refused (a typo must not pass silently).
FIELDS = {
    "completions": frozenset((*_SAMPLING, "prompt", "echo", "best_of", "suffix")),
    "chat": frozenset(
        (
            *_SAMPLING,
            *("messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice"),
            *("parallel_tool_calls", "functions", "function_call", "audio", "prediction"),
            *("store", "metadata", "service_tier", "modalities"),
        )
    ),
    "embeddings": frozenset(
        (
            *("model", "input", "encoding_format", "dimensions", "user"),
            *("latency_slo_ms", "max_quality_loss"),
        )
    ),
}

BadRequest = BadParameter  # a request field is wrong; `param` names it in the error body


# -- sampling parameters -------------------------------------------------------------------


def sampling(body: dict[str, Any], chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI request body; a bad value is a 400 naming its field."""
    values = body
    if chat and body.get("max_completion_tokens") is not None:
        values = {**body, "max_tokens": body["max_completion_tokens"]}
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest("user must be a string", "user")
    return sampling_params(values, logprobs=_logprobs(body, chat))


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    value = body.get("logprobs")
    if not chat:
        return None if value is None else whole(value, "logprobs")
    if value is None or value is False:
        if body.get("top_logprobs") is not None:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    if value is not True:
        raise BadRequest("logprobs must be true or false for chat completions", "logprobs")
    top = body.get("top_logprobs")
    return 0 if top is None else whole(top, "top_logprobs")


def stream_options(body: dict[str, Any]) -> bool | None:
    """None: no streaming; else whether to send a final usage chunk."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream not in (None, True, False):
        raise BadRequest("stream must be true or false", "stream")
    if not stream:
        if options is not None:
            raise BadRequest(
                "stream_options is only allowed with stream: true; set stream: true or "
                "leave stream_options out",
                "stream_options",
            )
        return None
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest("stream_options.include_usage must be true or false", "stream_options")
    return include


def timeout(body: dict[str, Any]) -> float | None:
    """`timeout`: seconds the whole request may take (as v2's `timeout` parameter); past it
    the request fails with 504 (or an error event, once streaming) and stops generating."""
    value = body.get("timeout")
    if value is None:
        return None
    seconds = number(value, "timeout")
    if seconds <= 0:
        raise DeadlineExceeded("the request's timeout passed before it reached the model")
    return seconds


def check_sizes(items: list[Any], param: str, max_bytes: int, max_items: int) -> None:
    """The v2 tensor limits, applied to text inputs: at most `max_items` texts (or token ids
    per prompt) and `max_bytes` UTF-8 bytes per text."""
    if len(items) > max_items:
        raise BadRequest(
            f"{param} has {len(items)} items, over the limit of {max_items}; send fewer or "
            "raise --max-tensor-elements",
            param,
        )
    for item in items:
        if isinstance(item, str):
            # 4 bytes per character at most: encode only the texts that may be over.
            if len(item) * 4 > max_bytes and len(item.encode("utf-8")) > max_bytes:
                raise BadRequest(
                    f"{param}: a text is over the limit of {max_bytes} bytes; send shorter "
                    "texts or raise --max-string-bytes",
                    param,
                )
        elif isinstance(item, list) and len(item) > max_items:
            raise BadRequest(
                f"{param}: a prompt has {len(item)} token ids, over the limit of {max_items}",
                param,
            )


def refuse_unsupported(body: dict[str, Any], route: str) -> None:
    """A 400 naming the first field this server does not implement or does not know."""
    for name in _UNSUPPORTED:
        if body.get(name):
            raise BadRequest(f"{name} is not supported by this server; leave it out", name)
    known = FIELDS[route]
    for name in body:
        if name not in known:
            raise BadRequest(
                f"unknown field {str(name)[:80]!r} in a /v1/{route} request; check its "
                f"spelling or leave it out (fields taken: {', '.join(sorted(known))})",
                str(name)[:80],
            )
    if body.get("modalities") not in (None, ["text"]):
        raise BadRequest("modalities: only ['text'] is supported", "modalities")


# -- inputs --------------------------------------------------------------------------------


def model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required: the name of a model in the repository", "model")
    return model


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def prompts(value: Any) -> list[Any]:
    """A completion request's prompts: each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if _is_ids(value):
            return [value]
        if all(isinstance(p, str) or (_is_ids(p) and p) for p in value):
            return list(value)
    raise BadRequest(
        "prompt must be a string, a list of strings, a list of token ids, or a list of lists "
        "of token ids (none empty)",
        "prompt",
    )


def messages(value: Any) -> list[dict[str, str]]:
    """{role, content} each; an assistant's earlier tool calls become its text, as it wrote
    them (<tool_call>{"name", "arguments"}</tool_call>), so the model sees what it called."""
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role", "messages")
        text = _content(message.get("content"), i) + _calls_text(message.get("tool_calls"), i)
        out.append({"role": message["role"], "content": text})
    return out


def _calls_text(calls: Any, i: int) -> str:
    if calls is None:
        return ""
    try:
        functions = [call["function"] for call in calls]
        docs = [{"name": f["name"], "arguments": json.loads(f["arguments"])} for f in functions]
    except (TypeError, KeyError, ValueError):
        raise BadRequest(
            f"messages[{i}].tool_calls must be a list of {{function: {{name, arguments}}}} "
            "with arguments a JSON string",
            "messages",
        ) from None
    return "".join(f"<tool_call>{json.dumps(doc)}</tool_call>" for doc in docs)


def _content(value: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        strings = [t for t in texts if isinstance(t, str)]
        if len(strings) == len(value):
            return "".join(strings)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")


def embedding_input(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return value
    if isinstance(value, list) and value and (_is_ids(value) or all(_is_ids(v) for v in value)):
        raise BadRequest(
            "token ids are not supported by /v1/embeddings here; send the text (a string or a "
            "list of strings)",
            "input",
        )
    raise BadRequest("input must be a non-empty string or list of strings", "input")


def vector(row: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32 bytes, as the openai client decodes them
        return base64.b64encode(row.tobytes()).decode("ascii")
    return row.tolist()  # type: ignore[no-any-return]
