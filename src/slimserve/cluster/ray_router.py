"""Our Ray Serve request router: model-aware routing (policies.routing) over the stats each
replica publishes (`record_routing_stats`: resident model:variants, free budget, requests in
flight), with Ray's own, fresher queue-length cache for the queue depth.

What a request is for: Ray's HTTP proxy hands the router the request's ASGI scope (pickled,
the body still at the proxy) and a few headers. The model is the `serve_multiplexed_model_id`
header where a client sets it (`model` or `model:variant`; the way to route OpenAI calls,
whose model is in the body), else the name in a v2 path (/v2/models/NAME/...). The scope is
read with `pickletools.genops`, which walks the opcodes without building any object: the
router never unpickles. Prefix affinity needs the prompt, which is in the body that Ray's
proxy has not read when it routes: it applies to calls made through a Ray handle
(`handle.post.remote(path, body)`, cluster.ray_replica), whose body the router sees; the
replicas publish the prefix hashes of the prompts they served (README, scale-out).
"""

from __future__ import annotations

import pickletools
import random
import re
import time
from typing import Any

# Ray 2.58's public router API (the module re-exports them without an __all__).
from ray.serve.request_router import (
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from slimserve.cluster.replica_app import request_prefixes
from slimserve.policies.routing import ReplicaStats, RouteConfig, RouteRequest, route

V2_PATH = re.compile(r"^/v2/models/([^/]+)")
# A cold model just routed counts as resident on its replica until that replica reports
# again (its report then lists the model, loading or loaded, or not: it was evicted), or
# for at most this long.
ASSUMED_RESIDENT_S = 5.0


class SlimserveRouter(RequestRouter):
    """Ranks replicas for each request with policies.routing.route."""

    def initialize_state(self, **kwargs: Any) -> None:
        """kwargs (request_router_kwargs): imbalance (queue length), seed (for tests)."""
        self._config = RouteConfig(imbalance=int(kwargs.get("imbalance", 8)))
        self._rng = random.Random(kwargs.get("seed"))
        # model key -> (replica, when routed, that replica's report count then)
        self._recent: dict[str, tuple[str, float, int]] = {}
        self.decisions: dict[str, int] = {}  # reason -> count (for tests and benchmarks)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = request_key(pending_request) if pending_request is not None else None
        body = handle_post(pending_request) if pending_request is not None else None
        prefixes = request_prefixes(*body) if body is not None else ()
        now = time.monotonic()
        stats = [self._stats(r, key, now) for r in candidate_replicas]
        decision = route(self._config, stats, RouteRequest(key, prefixes=prefixes), self._rng)
        self.decisions[decision.reason] = self.decisions.get(decision.reason, 0) + 1
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        first, *rest = (by_id[name] for name in decision.ranked)
        if key is not None:
            seq = int((first.routing_stats or {}).get("seq", 0))
            self._recent[key] = (first.replica_id.unique_id, now, seq)
        return [[first], rest] if rest else [[first]]

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: Any = None
    ) -> None:
        """Give `replica` to the request it was chosen for; if that one is gone (answered or
        cancelled) or the routing task had none, to the oldest request still waiting.

        Ray's base router only does the first: a routing task that exits after taking a
        request from the queue (when there are more tasks than requests) leaves that request
        waiting for ever; the FIFO fallback (Ray's FIFOMixin does the same) hands it on.
        Under four concurrent clients the exact-match-only router hung requests for 30 s.
        """
        matched = self._get_pending_request_matching_internal_request_id(request_metadata)
        while matched is None and self._pending_requests_to_fulfill:
            head = self._pending_requests_to_fulfill.popleft()
            matched = None if head.future.done() else head
        if matched is not None:
            self._record_queue_wait_time(matched)
            matched.future.set_result(replica)
            self._remove_pending_request_from_indices(matched)

    def _stats(self, replica: RunningReplica, key: str | None, now: float) -> ReplicaStats:
        published: dict[str, Any] = replica.routing_stats or {}
        name = replica.replica_id.unique_id
        resident = set(published.get("resident", ()))
        recent = self._recent.get(key) if key is not None else None
        if key is not None and recent is not None and recent[0] == name:
            unreported = int(published.get("seq", 0)) == recent[2]
            resident.update([key] if unreported and now - recent[1] < ASSUMED_RESIDENT_S else [])
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        queue = cached if cached is not None else int(published.get("queue", 0))
        free, prefixes = int(published.get("free_bytes", 0)), published.get("prefixes", ())
        return ReplicaStats(name, frozenset(resident), free, queue, frozenset(prefixes))


def handle_post(request: PendingRequest) -> tuple[str, dict[str, Any]] | None:
    """(path, body) of a `post` call made through a Ray handle; None for anything else."""
    args = request.args
    if request.metadata.call_method != "post" or len(args) != 2:
        return None
    path, body = args
    return (path, body) if isinstance(path, str) and isinstance(body, dict) else None


def request_key(request: PendingRequest) -> str | None:
    """The "model:variant" a request is for, or None (see the module's doc)."""
    model = request.metadata.multiplexed_model_id
    post = handle_post(request)
    if not model and post is not None:
        named = post[1].get("model")
        model = named if isinstance(named, str) else ""
        match = V2_PATH.match(post[0])
        model = model or (match.group(1) if match else "")
    if model:
        return model if ":" in model else f"{model}:"
    path = scope_path(request.args[0]) if request.args else None
    match = V2_PATH.match(path or "")
    return f"{match.group(1)}:" if match else None


def scope_path(arg: Any) -> str | None:
    """The ASGI scope's "path" out of Ray's pickled HTTP request, reading opcodes only."""
    if not isinstance(arg, bytes):
        return None
    previous: str | None = None
    try:
        for _op, value, _pos in pickletools.genops(arg):
            if isinstance(value, str):
                if previous == "path":
                    return value
                previous = value
    except (ValueError, IndexError):  # not a pickle stream we understand: route without a key
        return None
    return None
