"""OpenAI structured output and tool calls: request fields to a Grammar, output text to calls.

`response_format`:
  {"type": "text"}                                   no constraint
  {"type": "json_object"}                            any JSON object
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}   that schema

`tools` (functions only) with `tool_choice`:
  "none"                                     tools are ignored: plain text
  "auto" (the default with tools)            text, or one call written as
                                             <tool_call>{"name": .., "arguments": {..}}</tool_call>
  "required"                                 one call to any of the tools, as bare JSON
  {"type": "function", "function": {"name"}} one call to that tool, as bare JSON

Either way decoding is constrained (runtimes/llm/grammar.py): the JSON always parses and
matches the schema (the call's arguments match the function's `parameters`), unless
max_tokens cuts it short (finish_reason "length"). The tools are described to the model in a
system message, since chat templates differ in how (or whether) they render tools.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from slimserve.serving.llm import Grammar
from slimserve.serving.sampling_args import BadParameter

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True, slots=True)
class Structured:
    """What a chat request's response_format and tools ask of generation and of the reply."""

    grammar: Grammar | None = None
    tools: tuple[dict[str, Any], ...] = ()  # the functions a call may name ({name, ...})
    tagged: bool = False  # auto: a call is wrapped in <tool_call> tags, else text

    @property
    def calls(self) -> bool:
        """Whether the output may be a tool call (the reply then parses it)."""
        return bool(self.tools)


def response_format(body: dict[str, Any]) -> Grammar | None:
    """The grammar `response_format` asks for, or None for plain text."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadParameter(
                "response_format.json_schema.schema must be a JSON Schema object",
                "response_format",
            )
        return Grammar("json_schema", json.dumps(schema))
    raise BadParameter(
        "response_format.type must be text, json_object or json_schema", "response_format"
    )


def plan(body: dict[str, Any]) -> Structured:
    """The chat request's constraint: from tools and tool_choice, else response_format."""
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    if choice is not None and not tools:
        raise BadParameter("tool_choice needs tools; give tools or leave it out", "tool_choice")
    if not tools or choice == "none":
        return Structured(response_format(body))
    if body.get("response_format") not in (None, {"type": "text"}):
        raise BadParameter(
            "response_format and tools together are not supported; use one of them",
            "response_format",
        )
    if choice in (None, "auto"):
        return Structured(_lark_auto(tools), tuple(tools), tagged=True)
    if choice == "required":
        return Structured(_call_grammar(tools), tuple(tools))
    named = _named(choice, tools)
    return Structured(_call_grammar([named]), (named,))


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadParameter("tools must be a list of {type: function, function: {...}}", "tools")
    functions = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not function:
            raise BadParameter(f"tools[{i}] must be {{type: function, function: {{...}}}}", "tools")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadParameter(f"tools[{i}].function.name must be a string", "tools")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise BadParameter(f"tools[{i}].function.parameters must be a JSON Schema", "tools")
        functions.append({**function, "parameters": parameters})
    return functions


def _named(choice: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
    for tool in tools:
        if tool["name"] == name:
            return tool
    raise BadParameter(
        "tool_choice must be none, auto, required or {type: function, function: {name}} "
        f"naming one of the tools ({', '.join(t['name'] for t in tools)})",
        "tool_choice",
    )


def _call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A call to one of `tools`: {"name": its name, "arguments": its parameters}."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _call_grammar(tools: list[dict[str, Any]]) -> Grammar:
    return Grammar("json_schema", json.dumps(_call_schema(tools)))


def _lark_auto(tools: list[dict[str, Any]]) -> Grammar:
    """Text that does not start with '<', or one tagged call (whitespace around the JSON
    allowed: templates that render tools ask for newlines there)."""
    lines = [
        "start: call | text",
        f'call: "{_OPEN}" /[ \\n]*/ body /[ \\n]*/ "{_CLOSE}"',
        f"body: %json {json.dumps(_call_schema(tools))}",
        "text: /[^<][\\s\\S]*/",
    ]
    return Grammar("lark", "\n".join(lines) + "\n")


def with_tools(messages: list[dict[str, Any]], structured: Structured) -> list[dict[str, Any]]:
    """The messages with the tools described in the system message (one added if none)."""
    if not structured.calls:
        return messages
    specs = [
        {k: t[k] for k in ("name", "description", "parameters") if k in t} for t in structured.tools
    ]
    how = (
        f"To call one, answer with {_OPEN}" + '{"name": ..., "arguments": {...}}' + _CLOSE
        if structured.tagged
        else 'Answer with one call: {"name": ..., "arguments": {...}}'
    )
    text = f"You can call these functions:\n{json.dumps(specs)}\n{how}"
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_calls(text: str, structured: Structured) -> list[dict[str, Any]] | None:
    """The OpenAI tool_calls in a choice's text, or None when it is plain text (or a call
    cut short by max_tokens)."""
    body = text.strip()
    if structured.tagged:
        if not (body.startswith(_OPEN) and body.endswith(_CLOSE)):
            return None
        body = body[len(_OPEN) : -len(_CLOSE)]
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or "name" not in call:
        return None
    arguments = json.dumps(call.get("arguments", {}))
    function = {"name": call["name"], "arguments": arguments}
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}]
