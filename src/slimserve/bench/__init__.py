"""`slimserve bench`: a cheap closed-loop load generator for v2 HTTP (JSON, binary) and gRPC.

Usage: `slimserve bench --url http://127.0.0.1:8000 --model NAME --concurrency 1,8,64`.
"""

from __future__ import annotations

from slimserve.bench.command import register, run

__all__ = ["register", "run"]
