"""Shared by the gRPC transport tests: an engine stand-in that answers health, lets every
caller in and publishes error messages as they are; tests subclass it for the model calls
they need. The real engine is served end to end in tests/e2e/test_grpc.py."""

from __future__ import annotations

import socket
from typing import Any


class StandInEngine:
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def public(self, text: str) -> str:
        return text

    def authorize(self, token: str | None, scope: str, model: str | None = None) -> Any:
        from slimserve.security.keys import ANONYMOUS

        return ANONYMOUS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
