"""Our Ray request router's own state, driven the way Ray drives it (replica sets and reports
pushed with `update_replicas`, `choose_replicas` per request, `on_request_routed` once a
replica accepted) without a cluster: replicas are Ray's RunningReplica over its own
RunningReplicaInfo, minus the actor handle."""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import pytest
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    RequestMetadata,
    RunningReplicaInfo,
    StreamingHTTPRequest,
)
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from slimserve.cluster import ray_router
from slimserve.cluster.ray_router import SlimserveRouter
from slimserve.policies.routing import home_order, prefix_key_hash

DEPLOYMENT = DeploymentID(name="SlimserveReplica", app_name="slimserve")


class Replica(RunningReplica):
    """Ray's wrapper of one replica, without the actor behind it."""

    def __init__(self, info: RunningReplicaInfo) -> None:
        self._replica_info = info
        self._multiplexed_model_ids = set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def info(name: str, stats: dict[str, Any]) -> RunningReplicaInfo:
    return RunningReplicaInfo(
        ReplicaID(name, DEPLOYMENT), node_id="n", node_ip="127.0.0.1", availability_zone=None,
        actor_name=name, max_ongoing_requests=64, routing_stats=stats,
    )  # fmt: skip


def v2_call(model: str, loop: asyncio.AbstractEventLoop) -> PendingRequest:
    metadata = RequestMetadata("r", "i", call_method="post")
    body = {"inputs": []}
    return PendingRequest(
        [f"/v2/models/{model}/infer", body], {}, metadata, future=loop.create_future()
    )


def report(router: SlimserveRouter, stats: dict[str, dict[str, Any]]) -> None:
    """What Ray's controller pushes: every replica's latest routing stats."""
    router._update_running_replicas([info(name, s) for name, s in stats.items()])


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> SlimserveRouter:
    monkeypatch.setattr(ray_router, "REPORT_LAG_S", 0.2)
    made = SlimserveRouter(
        DEPLOYMENT, DeploymentHandleSource.REPLICA, create_replica_wrapper_func=Replica
    )
    made.initialize_state(seed=0)
    return made


def test_a_cold_model_sticks_to_where_it_was_sent_until_a_later_report_says_otherwise(
    router: SlimserveRouter,
):
    home, other = home_order("m:", ["a", "b"])
    sized = {"resident": ["x:"], "sizes": {"m:": 100, "x:": 100}}

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()

        async def send(seq: dict[str, int], free: dict[str, int]) -> str:
            report(router, {n: {**sized, "seq": seq[n], "free_bytes": free[n]} for n in seq})
            call = v2_call("m", loop)
            (first, *_), *_ = await router.choose_replicas(router._replicas_list, call)
            router.on_request_routed(call, first.replica_id, None)  # type: ignore[arg-type]
            return str(first.replica_id.unique_id)

        # Only the other replica has room: the model goes there (rule "room")...
        chosen = [await send({home: 1, other: 1}, {home: 0, other: 500})]
        # ...and stays there while the home now has room too, even when the other's
        # report (made before the request reached it) arrives at once without it.
        chosen.append(await send({home: 2, other: 2}, {home: 500, other: 500}))
        await asyncio.sleep(0.3)  # a report this much later, still without it: not there
        chosen.append(await send({home: 3, other: 3}, {home: 500, other: 500}))
        return chosen

    assert asyncio.run(main()) == [other, other, home]
    assert router.decisions == {"room": 2, "resident": 1}


def test_a_reported_model_is_resident_and_gone_replicas_are_forgotten(router: SlimserveRouter):
    async def main() -> tuple[str, set[str]]:
        loop = asyncio.get_running_loop()
        report(router, {"a": {"resident": []}, "b": {"resident": ["m:"], "seq": 1}})
        call = v2_call("m", loop)
        (first, *_), *_ = await router.choose_replicas(router._replicas_list, call)
        report(router, {"a": {"resident": []}})
        return str(first.replica_id.unique_id), set(router._reported)

    assert asyncio.run(main()) == ("b", {"a"})


def test_report_arrival_times_are_noted_once_per_report(router: SlimserveRouter):
    async def main() -> tuple[float, float, float]:
        report(router, {"a": {"seq": 1}})
        first = router._reported["a"][1]
        await asyncio.sleep(0.01)
        report(router, {"a": {"seq": 1}})  # the same report pushed again (another replica's)
        same = router._reported["a"][1]
        report(router, {"a": {"seq": 2}})
        return first, same, router._reported["a"][1]

    first, same, newer = asyncio.run(main())
    assert first == same < newer <= time.monotonic()


def http_call(model: str, key: bytes | None, loop: asyncio.AbstractEventLoop) -> PendingRequest:
    """An OpenAI call as Ray's HTTP proxy hands it to the router: the pickled
    StreamingHTTPRequest over the ASGI scope uvicorn made (body still at the proxy), the
    model from the `serve_multiplexed_model_id` header."""
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               (b"serve_multiplexed_model_id", model.encode())]  # fmt: skip
    if key is not None:
        headers.append((b"slimserve-prefix-key", key))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000), "state": {}}  # fmt: skip
    blob = pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="SERVE_PROXY_ACTOR-n"))
    metadata = RequestMetadata("r", "i", multiplexed_model_id=model)
    return PendingRequest([blob], {}, metadata, future=loop.create_future())


def test_an_http_prefix_key_goes_to_the_replica_that_served_it_among_resident_ones(
    router: SlimserveRouter,
):
    """The model resident on both replicas: without a key (or with a key neither served) the
    model's home order decides; with the key the other replica served, that replica wins."""
    home, other = home_order("tiny:", ["a", "b"])
    served = prefix_key_hash(b"conversation-42")

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        resident = {"resident": ["tiny:"], "seq": 1}
        report(router, {home: resident, other: {**resident, "prefixes": [served]}})
        chosen = []
        for key in (None, b"conversation-7", b"conversation-42", b"conversation-42"):
            (first, *_), *_ = await router.choose_replicas(
                router._replicas_list, http_call("tiny", key, loop)
            )
            chosen.append(str(first.replica_id.unique_id))
        return chosen

    assert asyncio.run(main()) == [home, home, other, other]
    assert router.decisions == {"resident": 4}


def test_an_http_prefix_key_leads_a_cold_model_to_the_replica_that_served_it(
    router: SlimserveRouter,
):
    home, other = home_order("tiny:", ["a", "b"])

    async def main() -> str:
        report(router, {home: {"seq": 1},
                        other: {"seq": 1, "prefixes": [prefix_key_hash(b"k")]}})  # fmt: skip
        call = http_call("tiny", b"k", asyncio.get_running_loop())
        (first, *_), *_ = await router.choose_replicas(router._replicas_list, call)
        return str(first.replica_id.unique_id)

    assert asyncio.run(main()) == other
    assert router.decisions == {"prefix": 1}
