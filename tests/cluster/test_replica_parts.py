"""The Ray-free parts of a replica and the router's reading of Ray's HTTP requests."""

from __future__ import annotations

import asyncio
import pickle

import httpx
from starlette.types import Receive, Scope, Send

from slimserve.cluster.replica_app import (
    PrefixIndex,
    ReplicaApp,
    ResidencyReports,
    key_prefixes,
    post_json,
    prompt_text,
    request_prefixes,
    routing_stats,
)
from slimserve.policies.routing import PREFIX_BLOCK_CHARS, prefix_key_hash
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


def test_routing_stats_from_health_and_loaded_or_loading_models():
    health = HealthReport("ok", True, True, (), (), (), resident_bytes=300,
                          memory_budget_bytes=1000)  # fmt: skip
    units = [
        RepositoryEntry("mlp", "2", "READY"),
        RepositoryEntry("mlp:fast", "2", "LOADING"),
        RepositoryEntry("m2", "1", "UNLOADED"),
        RepositoryEntry("m3", "1", "UNAVAILABLE"),
    ]
    assert routing_stats(health, units, 4, ["h1"], seq=7, sizes={"mlp:": 300}) == {
        "resident": ["mlp:", "mlp:fast"], "free_bytes": 700, "queue": 4, "prefixes": ["h1"],
        "seq": 7, "sizes": {"mlp:": 300},
    }  # fmt: skip


def test_residency_reports_go_at_once_on_a_change_else_on_the_period():
    async def main() -> list[tuple[bool, float]]:
        reports, out = ResidencyReports(every_s=0.3), []
        loop = asyncio.get_running_loop()
        for change_after in (None, None, 0.05):  # the first report: at once
            if change_after is not None:
                loop.call_later(change_after, reports.changed)
            t = loop.time()
            out.append((await reports.wait(), loop.time() - t))
        return out

    (first, t1), (idle, t2), (changed, t3) = asyncio.run(main())
    assert first and t1 < 0.1
    assert not idle and t2 >= 0.29  # no change: the period
    assert changed and t3 < 0.25  # a change ends the wait early


LONG = "You are a helpful assistant for a shop selling garden tools. " * 12  # > 2 blocks


def test_prompt_prefixes_are_the_same_for_a_replica_and_the_router_and_extend():
    chat = {"model": "tiny", "messages": [{"role": "system", "content": LONG},
                                          {"role": "user", "content": "a spade?"}]}  # fmt: skip
    longer = {**chat, "messages": [*chat["messages"], {"role": "user", "content": "and a rake"}]}
    first = request_prefixes("/v1/chat/completions", chat)
    assert len(first) == len(prompt_text("/v1/chat/completions", chat)) // PREFIX_BLOCK_CHARS
    assert len(first) >= 2
    assert request_prefixes("/v1/chat/completions", longer)[: len(first)] == first
    assert request_prefixes("/v1/completions", {"prompt": LONG})
    assert request_prefixes("/v2/models/m/infer", {"inputs": []}) == ()
    assert request_prefixes("/v1/completions", {"prompt": [1, 2]}) == ()  # token ids: none


def test_the_prefix_index_keeps_the_most_recent_hashes():
    index = PrefixIndex(size=3)
    index.add(["a", "b", "c"])
    index.add(["a", "d"])  # a used again: b is now the oldest
    assert index.published() == ["c", "a", "d"]


def test_a_replica_publishes_the_prefix_key_of_each_http_request_it_answered():
    """The `slimserve-prefix-key` header of a request answered 200 joins the replica's prefix
    index as the hash the router computes for it; failed requests and other headers do not."""

    async def status_app(scope: Scope, receive: Receive, send: Send) -> None:
        status = 200 if scope["path"] == "/ok" else 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    index = PrefixIndex()
    app = ReplicaApp(status_app, "r1", prefixes=index)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/ok", headers={"Slimserve-Prefix-Key": "conversation-42"})
            await client.post("/missing", headers={"slimserve-prefix-key": "conversation-7"})
            await client.post("/ok", headers={"x-other": "conversation-9"})
            await client.post("/ok")

    asyncio.run(main())
    assert index.published() == [prefix_key_hash(b"conversation-42")]
    assert key_prefixes(b"conversation-42") == (prefix_key_hash(b"conversation-42"),)
    assert key_prefixes(b"") == ()


def test_post_json_runs_one_request_through_the_app():
    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        body = (await receive())["body"]
        assert scope["path"] == "/v1/completions" and scope["method"] == "POST"
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    assert asyncio.run(post_json(echo, "/v1/completions", {"a": [1]})) == (201, {"a": [1]})


def test_the_router_reads_model_and_prompt_of_a_handle_call():
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from slimserve.cluster.ray_router import handle_post, request_key

    def pending(method: str, *args: object) -> PendingRequest:
        future = loop.create_future()  # what Ray sets once a replica is chosen
        metadata = RequestMetadata("r", "i", call_method=method)
        return PendingRequest(list(args), {}, metadata, future=future)

    loop = asyncio.new_event_loop()
    try:
        body = {"model": "tiny", "prompt": LONG}
        call = pending("post", "/v1/completions", body)
        assert handle_post(call) == ("/v1/completions", body)
        assert request_key(call) == "tiny:"
        assert request_key(pending("post", "/v2/models/mlp/infer", {"inputs": []})) == "mlp:"
        assert handle_post(pending("__call__", b"pickled scope")) is None
    finally:
        loop.close()


def test_the_router_reads_the_v2_model_out_of_rays_request_without_unpickling():
    from ray.serve._private.common import StreamingHTTPRequest

    from slimserve.cluster.ray_router import scope_header, scope_path

    scope = {"type": "http", "method": "POST", "path": "/v2/models/mlp/versions/2/infer",
             "headers": [(b"path", b"/elsewhere")], "query_string": b""}  # fmt: skip
    blob = pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="proxy"))
    assert scope_path(blob) == "/v2/models/mlp/versions/2/infer"
    assert scope_path(b"not a pickle") is None
    keyed = {**scope, "headers": [(b"host", b"h"), (b"slimserve-prefix-key", b"chat-1")]}
    keyed_blob = pickle.dumps(StreamingHTTPRequest(keyed, proxy_actor_name="proxy"))
    assert scope_header(keyed_blob, b"slimserve-prefix-key") == b"chat-1"
    assert scope_header(blob, b"slimserve-prefix-key") is None
    assert scope_header(b"not a pickle", b"host") is None
    assert scope_path({"path": "/x"}) is None
