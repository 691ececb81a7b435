"""Compare load-generator clients on one server: slimserve's keep-alive Protocol vs aiohttp.

    python benchmarks/client_overhead.py --url http://127.0.0.1:8000 --model mlp-onnx \
        --input-file request.json [--duration 3]

Each client posts the same v2 JSON body in a closed loop (1 and 64 concurrent) on uvloop, and
we report requests/s and the client's own CPU time per request: the cheaper the client, the
more of the 2 cores the server under test keeps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from slimserve.bench import payload as pl
from slimserve.bench.drivers import HttpDriver
from slimserve.bench.http_client import parse_http_url
from slimserve.bench.runner import closed_loop, new_loop, summarize


async def _ours(url: str, model: str, body: pl.Payload, n: int, duration: float):
    host, port = parse_http_url(url)
    driver = HttpDriver("http-json", host, port, model, "", body)
    sends = await driver.senders(n)
    rec, cpu = await closed_loop(sends, duration, 0.5)
    await driver.close()
    return summarize("ours", n, duration, rec, cpu)


async def _aiohttp(url: str, model: str, body: pl.Payload, n: int, duration: float):
    import aiohttp

    data = pl.json_body(body)
    target = f"{url}/v2/models/{model}/infer"
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:

        async def send() -> str:
            async with session.post(target, data=data, headers=headers) as r:
                await r.read()
                return "ok" if r.status == 200 else str(r.status)

        rec, cpu = await closed_loop([send] * n, duration, 0.5)
    return summarize("aiohttp", n, duration, rec, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-file", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    body = pl.from_request_file(args.input_file)
    loop = new_loop()
    print(f"{'client':<9}{'clients':>8}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'client us/req':>15}")
    for n in (1, 64):
        for fn in (_ours, _aiohttp):
            r = loop.run_until_complete(fn(args.url, args.model, body, n, args.duration))
            print(
                f"{r.protocol:<9}{n:>8}{r.rps:>9.0f}{r.p50_ms:>8.2f}{r.p99_ms:>8.2f}"
                f"{r.client_cpu_us:>15.0f}",
                flush=True,
            )
            time.sleep(0.2)
    loop.close()


if __name__ == "__main__":
    main()
