"""The Ray-free parts of a replica and the router's reading of Ray's HTTP requests."""

from __future__ import annotations

import asyncio
import pickle

import httpx
from starlette.types import Receive, Scope, Send

from slimserve.cluster.replica_app import ReplicaApp, routing_stats
from slimserve.types import HealthReport, RepositoryEntry


async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(0.05)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"1")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_every_response_names_the_replica_and_in_flight_is_counted():
    now = [100.0]
    app = ReplicaApp(slow_app, "r1", clock=lambda: now[0])
    seen: list[tuple[int, float]] = []

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            calls = [asyncio.create_task(client.get("/a")) for _ in range(3)]
            await asyncio.sleep(0.02)
            now[0] = 102.5
            seen.append((app.in_flight(), app.oldest_age_s()))
            return await asyncio.gather(*calls)

    responses = asyncio.run(main())
    assert [r.headers["slimserve-replica"] for r in responses] == ["r1"] * 3
    assert all(r.headers["x"] == "1" for r in responses)  # the app's own headers stay
    assert seen == [(3, 2.5)]
    assert app.in_flight() == 0 and app.oldest_age_s() == 0.0


def test_routing_stats_from_health_and_ready_models():
    health = HealthReport("ok", True, True, (), (), (), resident_bytes=300,
                          memory_budget_bytes=1000)  # fmt: skip
    ready = [RepositoryEntry("mlp", "2", "READY"), RepositoryEntry("mlp:fast", "2", "READY")]
    assert routing_stats(health, ready, 4) == {
        "resident": ["mlp:", "mlp:fast"], "free_bytes": 700, "queue": 4,
    }  # fmt: skip


def test_the_router_reads_the_v2_model_out_of_rays_request_without_unpickling():
    from ray.serve._private.common import StreamingHTTPRequest

    from slimserve.cluster.ray_router import scope_path

    scope = {"type": "http", "method": "POST", "path": "/v2/models/mlp/versions/2/infer",
             "headers": [(b"path", b"/elsewhere")], "query_string": b""}  # fmt: skip
    blob = pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="proxy"))
    assert scope_path(blob) == "/v2/models/mlp/versions/2/infer"
    assert scope_path(b"not a pickle") is None
    assert scope_path({"path": "/x"}) is None
