"""Structured logs carry the request id of the request being served."""

from __future__ import annotations

import logging

import orjson

from slimserve.logs import JsonFormatter, request_id


def _record(msg: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("slimserve.test", logging.WARNING, __file__, 1, msg, (), exc_info)


def test_json_lines_with_request_id_inside_a_request():
    fmt = JsonFormatter()
    outside = orjson.loads(fmt.format(_record("idle")))
    token = request_id.set("req-42")
    try:
        inside = orjson.loads(fmt.format(_record("serving %s")))
    finally:
        request_id.reset(token)
    assert "request_id" not in outside
    assert inside["request_id"] == "req-42" and inside["level"] == "warning"
    assert inside["logger"] == "slimserve.test" and inside["time"].endswith("+00:00")


def test_exceptions_are_one_json_line():
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        line = JsonFormatter().format(_record("failed", sys.exc_info()))
    assert "\n" not in line
    assert "ValueError: bad" in orjson.loads(line)["error"]
