"""`slimserve bench`: drive a running server and print requests/s and latency percentiles."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slimserve.bench import payload as pl
from slimserve.bench.drivers import (
    PROTOCOLS,
    GrpcDriver,
    HttpDriver,
    NativeGrpcDriver,
    fetch_metadata,
)
from slimserve.bench.http_client import parse_http_url
from slimserve.bench.runner import Result, closed_loop, new_loop, open_loop, summarize
from slimserve.cli_parts import command
from slimserve.errors import InvalidArgument, Unavailable

# Time allowed after the window for the last in-flight requests to answer, in seconds.
_GRACE_S = 30.0


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give positive integers separated by commas, e.g. 1,8,64"
        )
    return values


def _protocols(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    wrong = [v for v in values if v not in PROTOCOLS]
    if not values or wrong:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use one or more of {', '.join(PROTOCOLS)}, separated by commas"
        )
    return values


def _seconds(text: str, minimum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= minimum or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds >= {minimum:g}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give requests per second, a number > 0")
    return value


def _parameter(text: str) -> tuple[str, bool | int | float | str]:
    """KEY=VALUE; the value read as a YAML scalar (5 -> int, 2.5 -> float, true -> bool)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE, e.g. latency_slo_ms=5")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if not isinstance(value, bool | int | float | str):
        value = raw
    return key.strip(), value


ABOUT = """load-test a running server over HTTP (JSON, binary) and gRPC
Closed-loop load: N clients, each with one request in flight, for a fixed time; prints
requests/s, p50/p90/p99/max latency and errors per protocol and N.
"""


def register(subparsers: Any) -> None:
    p = command(subparsers, "bench", run, ABOUT)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server HTTP address")
    p.add_argument(
        "--grpc-url",
        default=None,
        help="server gRPC address host:port (default: --url's host, port 8001)",
    )
    p.add_argument("--model", required=True, help="model to call (a served name: NAME[:VARIANT])")
    p.add_argument("--model-version", default="", help="version to call (default: the server's)")
    p.add_argument(
        "--concurrency",
        type=_positive_ints,
        default=[1, 8, 64],
        help="concurrent clients, comma-separated (default 1,8,64)",
    )
    p.add_argument(
        "--duration",
        type=lambda t: _seconds(t, 0.1),
        default=10.0,
        help="measured seconds per protocol and concurrency (default 10)",
    )
    p.add_argument(
        "--warmup",
        type=lambda t: _seconds(t, 0.0),
        default=2.0,
        help="seconds of load before measuring (default 2)",
    )
    p.add_argument(
        "--protocol",
        type=_protocols,
        default=list(PROTOCOLS),
        help="comma-separated: http-json,http-binary,grpc (default all three)",
    )
    p.add_argument(
        "--input-file",
        type=Path,
        default=None,
        help="a v2 JSON request body to send (default: random inputs from metadata)",
    )
    p.add_argument(
        "--batch-size",
        type=lambda t: _positive_ints(t)[0],
        default=1,
        help="rows per synthetic request (default 1)",
    )
    p.add_argument(
        "--grpc-client",
        choices=("native", "grpcio"),
        default="native",
        help="gRPC load generator: 'native' (a lean HTTP/2 client, a fraction of the CPU per "
        "call) or 'grpcio' (grpc.aio); it shares the machine's cores with the server",
    )
    p.add_argument(
        "--rate",
        type=_rate,
        default=None,
        help="open loop: Poisson arrivals at this many requests/s, over at most --concurrency "
        "connections; latency counts from each scheduled arrival (default: closed loop)",
    )
    p.add_argument(
        "--parameter",
        type=_parameter,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a request parameter sent with every request, e.g. latency_slo_ms=5 (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")


@dataclass(frozen=True, slots=True)
class Plan:
    host: str
    port: int
    grpc_target: str
    model: str
    version: str
    protocols: list[str]
    concurrency: list[int]
    duration_s: float
    warmup_s: float
    grpc_client: str = "native"
    rate_rps: float | None = None  # open loop at this rate; None: closed loop


def plan_from_args(args: argparse.Namespace) -> Plan:
    host, port = parse_http_url(args.url)
    grpc_target = args.grpc_url or f"{host}:8001"
    if "://" in grpc_target:
        raise InvalidArgument(f"--grpc-url {grpc_target!r}: give host:port without a scheme")
    return Plan(
        host,
        port,
        grpc_target,
        args.model,
        args.model_version,
        args.protocol,
        args.concurrency,
        args.duration,
        args.warmup,
        getattr(args, "grpc_client", "native"),
        getattr(args, "rate", None),
    )


async def _payload(args: argparse.Namespace, plan: Plan) -> pl.Payload:
    p = await _inputs(args, plan)
    return dataclasses.replace(p, parameters=tuple(getattr(args, "parameter", [])))


async def _inputs(args: argparse.Namespace, plan: Plan) -> pl.Payload:
    if args.input_file is not None:
        return pl.from_request_file(args.input_file)
    try:
        meta = await fetch_metadata(plan.host, plan.port, plan.model, plan.version)
    except Unavailable as exc:
        # Synthetic inputs need the model's metadata, which only HTTP serves here.
        raise Unavailable(
            f"{exc.message} (or give --input-file to skip the metadata call)"
        ) from None
    return pl.from_metadata(meta, batch_size=args.batch_size)


Driver = HttpDriver | GrpcDriver | NativeGrpcDriver


def _driver(protocol: str, plan: Plan, p: pl.Payload) -> Driver:
    if protocol == "grpc" and plan.grpc_client == "grpcio":
        return GrpcDriver(plan.grpc_target, plan.model, plan.version, p)
    if protocol == "grpc":
        return NativeGrpcDriver(plan.grpc_target, plan.model, plan.version, p)
    return HttpDriver(protocol, plan.host, plan.port, plan.model, plan.version, p)


async def _measure(driver: Driver, n: int, plan: Plan) -> Result:
    sends = await driver.senders(n)
    if plan.rate_rps is None:
        loop = closed_loop(sends, plan.duration_s, plan.warmup_s)
    else:
        loop = open_loop(sends, plan.rate_rps, plan.duration_s, plan.warmup_s)
    run = asyncio.ensure_future(loop)
    try:
        rec, cpu = await asyncio.wait_for(run, plan.duration_s + plan.warmup_s + _GRACE_S)
    except TimeoutError:
        raise Unavailable(
            f"{driver.protocol} with {n} clients: requests still unanswered {_GRACE_S:g} s after "
            "the run ended; the server is stuck or far overloaded"
        ) from None
    finally:
        await driver.close()
    return summarize(driver.protocol, n, plan.duration_s, rec, cpu)


async def bench(args: argparse.Namespace, plan: Plan) -> list[Result]:
    """Every protocol at every concurrency, one after the other."""
    p = await _payload(args, plan)
    results = []
    for protocol in plan.protocols:
        driver = _driver(protocol, plan, p)
        try:
            await driver.probe()  # a clear error now beats a table of failures
        except BaseException:
            await driver.close()
            raise
        for n in plan.concurrency:
            results.append(await _measure(driver, n, plan))
            if not args.json:
                print(format_row(results[-1]), flush=True)
    return results


HEADER = (
    f"{'protocol':<12}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    f"{'max ms':>9}{'errors':>8}{'client us/req':>15}"
)


def format_row(r: Result) -> str:
    errors = sum(r.errors.values())
    line = (
        f"{r.protocol:<12}{r.concurrency:>8}{r.rps:>10.1f}{r.p50_ms:>9.2f}{r.p90_ms:>9.2f}"
        f"{r.p99_ms:>9.2f}{r.max_ms:>9.2f}{errors:>8}{r.client_cpu_us:>15.0f}"
    )
    if errors:
        line += "  (" + ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) + ")"
    return line


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if not args.json:
        print(
            f"slimserve bench: model {plan.model} at {args.url}; {plan.duration_s:g} s per "
            f"row after {plan.warmup_s:g} s warm-up; "
            + ("closed loop" if plan.rate_rps is None else f"open loop, {plan.rate_rps:g} req/s"),
            flush=True,
        )
        print(HEADER, flush=True)
    loop = new_loop()
    try:
        results = loop.run_until_complete(bench(args, plan))
    finally:
        loop.close()
    if args.json:
        json.dump([r.to_dict() for r in results], sys.stdout, indent=1)
        print()
    return 1 if any(r.errors or not r.requests for r in results) else 0
