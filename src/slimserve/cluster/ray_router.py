"""Our Ray Serve request router: model-aware routing (policies.routing) over the stats each
replica publishes (`record_routing_stats`: resident model:variants and their sizes, free
budget, requests in flight), with Ray's own, fresher queue-length cache for the queue depth.

Residency is kept fresh two ways. Replicas report as soon as it changes (cluster.ray_replica;
Ray's controller relays each report to every router), and the router counts its own
decisions: a cold model it has just sent to replica R (Ray's `on_request_routed`, once R
accepted) is resident there until a report of R received REPORT_LAG_S after that leaves it
out, so the next requests for it follow the first instead of loading it elsewhere. Cold
models go to their home replica (rendezvous hashing, policies.routing), which every router
and proxy computes alike.

What a request is for: Ray's HTTP proxy hands the router the request's ASGI scope (pickled,
the body still at the proxy) and a few headers. The model is the `serve_multiplexed_model_id`
header where a client sets it (`model` or `model:variant`; the way to route OpenAI calls,
whose model is in the body), else the name in a v2 path (/v2/models/NAME/...). The scope is
read with `pickletools.genops`, which walks the opcodes without building any object: the
router never unpickles. Prefix affinity needs the prompt, which is in the body that Ray's
proxy has not read when it routes. Calls made through a Ray handle
(`handle.post.remote(path, body)`, cluster.ray_replica) carry it, and the router hashes the
prompt's prefixes; HTTP clients name their own affinity key instead, in the header
`slimserve-prefix-key` (a conversation id, a hash of the system prompt), which the router
reads out of the scope's headers the same way and hashes into a one-block prefix. Replicas
publish the prefix hashes of the prompts and keys they served (README, scale-out), so a
request goes, among the replicas where its model is resident, to the one that served its
prefix or key.
"""

from __future__ import annotations

import pickletools
import random
import re
import time
from collections.abc import Iterator
from typing import Any

# Ray 2.58's public router API (the module re-exports them without an __all__).
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from slimserve.cluster.replica_app import PREFIX_KEY_HEADER, key_prefixes, request_prefixes
from slimserve.policies.routing import (
    ReplicaStats,
    RouteConfig,
    RouteRequest,
    balanced_homes,
    route,
)

V2_PATH = re.compile(r"^/v2/models/([^/]+)")
# A report of a replica received this long after a cold model was sent there was made after
# that request reached it (report -> Ray's controller tick -> router: ~0.1-0.2 s): if it
# leaves the model out, the model was evicted or failed to load there.
REPORT_LAG_S = 1.0
ASSUMED_AT_MOST_S = 10.0  # and never longer than this (a replica that stopped reporting)
KEYS_SEEN_S = 60.0  # models requested this recently share the replicas out (balanced_homes)


class SlimserveRouter(RequestRouter):
    """Ranks replicas for each request with policies.routing.route."""

    def initialize_state(self, **kwargs: Any) -> None:
        """kwargs (request_router_kwargs): imbalance (queue length), seed (for tests)."""
        self._config = RouteConfig(imbalance=int(kwargs.get("imbalance", 8)))
        self._rng = random.Random(kwargs.get("seed"))
        self._assumed: dict[str, dict[str, float]] = {}  # replica -> {cold key sent: when}
        self._reported: dict[str, tuple[int, float]] = {}  # replica -> (report seq, received)
        self._sizes: dict[str, int] = {}  # "model:variant" -> resident bytes, as last reported
        self._seen: dict[str, float] = {}  # model key -> when last requested
        self._homes: tuple[frozenset[str], tuple[str, ...], dict[str, str]] = (
            frozenset(), (), {},
        )  # fmt: skip
        self._pruned = 0.0
        self.decisions: dict[str, int] = {}  # reason -> count (for tests and benchmarks)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray's controller pushed the replica set or a replica's new routing stats: note when
        each replica's report arrived (for REPORT_LAG_S) and the model sizes it lists."""
        super().update_replicas(replicas)
        now, names = time.monotonic(), set()
        for replica in replicas:
            name, stats = replica.replica_id.unique_id, replica.routing_stats or {}
            names.add(name)
            seq = int(stats.get("seq", 0))
            if self._reported.get(name, (-1, 0.0))[0] != seq:
                self._reported[name] = (seq, now)
            self._sizes.update(stats.get("sizes", {}))
        for gone in set(self._reported) - names:
            self._reported.pop(gone, None)
            self._assumed.pop(gone, None)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = request_key(pending_request) if pending_request is not None else None
        prefixes = request_prefixes_of(pending_request) if pending_request is not None else ()
        now = time.monotonic()
        stats = [self._stats(r, now) for r in candidate_replicas]
        size = self._sizes.get(key, 0) if key is not None else 0
        home = self._home(key, now) if key is not None else None
        request = RouteRequest(key, home=home, size_bytes=size, prefixes=prefixes)
        decision = route(self._config, stats, request, self._rng)
        self.decisions[decision.reason] = self.decisions.get(decision.reason, 0) + 1
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        first, *rest = (by_id[name] for name in decision.ranked)
        return [[first], rest] if rest else [[first]]

    def _home(self, key: str, now: float) -> str | None:
        """`key`'s home among all replicas (policies.routing.balanced_homes over the models
        requested in the last KEYS_SEEN_S), recomputed when those or the replicas change."""
        self._seen[key] = now
        if now - self._pruned > 1.0:
            self._pruned = now
            self._seen = {k: t for k, t in self._seen.items() if now - t < KEYS_SEEN_S}
        keys = frozenset(self._seen)
        names = tuple(sorted(r.unique_id for r in self.curr_replicas))
        if (keys, names) != self._homes[:2]:
            self._homes = (keys, names, balanced_homes(keys, names))
        return self._homes[2].get(key)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        """`replica_id` accepted the request: a model it has not reported counts as resident
        there from now on (see the module's doc)."""
        key = request_key(pending_request)
        name = replica_id.unique_id
        replica = self.curr_replicas.get(replica_id)
        published = (replica.routing_stats or {}) if replica is not None else {}
        if key is not None and key not in published.get("resident", ()):
            self._assumed.setdefault(name, {}).setdefault(key, time.monotonic())

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

    def _stats(self, replica: RunningReplica, now: float) -> ReplicaStats:
        published: dict[str, Any] = replica.routing_stats or {}
        name = replica.replica_id.unique_id
        resident = set(published.get("resident", ()))
        received = self._reported.get(name, (0, 0.0))[1]
        assumed = self._assumed.get(name, {})
        for key, sent in list(assumed.items()):
            if key in resident or received - sent >= REPORT_LAG_S or now - sent > ASSUMED_AT_MOST_S:
                del assumed[key]  # reported (resident, or not any more), or too old
            else:
                resident.add(key)
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


def request_prefixes_of(request: PendingRequest) -> tuple[str, ...]:
    """The prefix hashes a request asks affinity for: its prompt's (a handle call), or its
    PREFIX_KEY_HEADER's (an HTTP request through Ray's proxy); none for other requests."""
    body = handle_post(request)
    if body is not None:
        return request_prefixes(*body)
    key = scope_header(request.args[0], PREFIX_KEY_HEADER) if request.args else None
    return key_prefixes(key) if key else ()


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
    previous: str | None = None
    for value in _pickled_values(arg):
        if isinstance(value, str):
            if previous == "path":
                return value
            previous = value
    return None


def scope_header(arg: Any, name: bytes) -> bytes | None:
    """The value of the header `name` (lower case, as ASGI servers give it) out of Ray's
    pickled HTTP request: the scope's headers are (name, value) pairs of bytes, pickled one
    after the other. Opcodes only, like scope_path."""
    previous: str | bytes | None = None
    for value in _pickled_values(arg):
        if previous == name and isinstance(value, bytes):
            return value
        previous = value
    return None


def _pickled_values(arg: Any) -> Iterator[str | bytes]:
    """The str and bytes constants of a pickle, in order, without building any object."""
    if not isinstance(arg, bytes):
        return
    try:
        for _op, value, _pos in pickletools.genops(arg):
            if isinstance(value, (str, bytes)):
                yield value
    except (ValueError, IndexError):  # not a pickle stream we understand: route without it
        return
