"""Prometheus metrics of one node, served at ``GET /metrics`` on the internal API listener.

Counters the node keeps anyway (connections, closes by code, frames out, ...) are read at scrape
time by a custom collector, so metrics cost nothing per frame on the hot path. The one value the
node does not keep, the publish-to-send latency, is a Histogram observed once per publication in
the hub's `on_delivered` hook.

Every node gets its own `CollectorRegistry` (not prometheus_client's global one): a process may
run several nodes (tests do), and the global registry would refuse their duplicate names.

``/metrics`` answers without a key on the internal listener (which is private), unless the
node has a read-only ``metrics_key``: then scrape it with ``Authorization: Bearer <metrics key>``
(see ``docs/operations.md`` for a Prometheus scrape config). The API key is never needed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from igratech_ws.brokers.base import BrokerState, Publication
from igratech_ws.core.close_codes import OTHER, CloseCode, counted_as

PREFIX = "igratech_ws"
#: Publish-to-send latency buckets (seconds): sub-millisecond on one node, up to seconds when a
#: broker or a cross-node clock is slow.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class _Hub(Protocol):
    frames_out: int
    writes: int
    publications_in: int
    resyncs: int

    @property
    def channel_count(self) -> int: ...


class _Broker(Protocol):
    @property
    def state(self) -> BrokerState: ...


class MeteredNode(Protocol):
    """What the collector reads of a node (`igratech_ws.node.Node` provides it).

    `closes` maps a close code to how many connections closed with it; `connections_total`
    counts accepted connections. Optional attributes are exported when the node has them:
    ``messages_in: Mapping[str, int]`` (event name -> client frames received),
    ``rate_limited: int`` (messages dropped by the rate limit) and ``refused: Mapping[str, int]``
    (reason -> handshakes refused).
    """

    node_id: str
    hub: Any
    broker: Any
    closes: dict[int, int]
    connections_total: int
    draining: bool
    started_at: float

    @property
    def connection_count(self) -> int: ...

    def info(self) -> dict[str, Any]: ...


class NodeCollector(Collector):
    """Reads a node's counters at scrape time. Never mutates the node."""

    def __init__(self, node: MeteredNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        hub: _Hub = node.hub
        broker: _Broker = node.broker
        info = node.info()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["node"])
            family.add_metric([node.node_id], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["node"])
            family.add_metric([node.node_id], value)
            return family

        yield gauge("connections", "Open client connections.", node.connection_count)
        yield gauge("users", "Distinct authenticated users connected.", info.get("users", 0))
        yield gauge("channels", "Channels with at least one local follower.", hub.channel_count)
        yield gauge("draining", "1 while the node drains (refuses clients), else 0.", node.draining)
        yield gauge(
            "uptime_seconds", "Seconds since the node started.", time.time() - node.started_at
        )
        yield counter(
            "connections_accepted", "Connections accepted since start.", node.connections_total
        )
        yield counter("frames_out", "Frames queued to client connections.", hub.frames_out)
        yield counter(
            "socket_writes",
            "Writes of queued frames to client sockets (each carries every frame queued for its "
            "connection since the last; frames_out / socket_writes is the coalescing).",
            hub.writes,
        )
        yield counter(
            "publications_in", "Publications received from the broker.", hub.publications_in
        )
        yield counter("resyncs", "Channel resyncs after a gap or a broker reconnect.", hub.resyncs)
        # Read with getattr: a hub without state on follow or conflation reports nothing.
        snapshot_frames: int | None = getattr(hub, "snapshot_frames", None)
        if snapshot_frames is not None:
            yield counter(
                "snapshot_frames",
                "Frames sent right after a follow or connect as a channel's current state or "
                "asked-for history (marked snapshot).",
                snapshot_frames,
            )
        conflated_frames: int | None = getattr(hub, "conflated_frames", None)
        if conflated_frames is not None:
            yield counter(
                "conflated_frames",
                "Queued state frames dropped for a connection that was behind, replaced by a "
                "newer frame of their channel and event (marked conflated).",
                conflated_frames,
            )

        messages_in: Mapping[str, int] | None = getattr(node, "messages_in", None)
        if messages_in is not None:
            family = CounterMetricFamily(
                f"{PREFIX}_messages_in",
                "Client frames received, by event (ping, settings, invalid).",
                labels=["node", "event"],
            )
            for event, count in sorted(messages_in.items()):
                family.add_metric([node.node_id, event], count)
            yield family

        rate_limited: int | None = getattr(node, "rate_limited", None)
        if rate_limited is not None:
            yield counter(
                "rate_limited_messages",
                "Client messages dropped by the per-connection rate limit.",
                rate_limited,
            )
        refused: Mapping[str, int] | None = getattr(node, "refused", None)
        if refused is not None:
            family = CounterMetricFamily(
                f"{PREFIX}_handshakes_refused",
                "WebSocket handshakes refused, by reason.",
                labels=["node", "reason"],
            )
            for reason, count in sorted(refused.items()):
                family.add_metric([node.node_id, reason], count)
            yield family

        closes = CounterMetricFamily(
            f"{PREFIX}_closes",
            "Connections closed, by WebSocket close code (codes outside the documented table: "
            "`other`).",
            labels=["node", "code"],
        )
        by_label: dict[str, int] = {}
        for code, count in node.closes.items():
            # Labels only from the close table: a client picks its close code, and each
            # distinct label would be a new series.
            key = counted_as(code)
            label = "other" if key == OTHER else str(key)
            by_label[label] = by_label.get(label, 0) + count
        for label, count in sorted(by_label.items()):
            closes.add_metric([node.node_id, label], count)
        yield closes
        yield counter(
            "slow_consumer_closes",
            "Connections closed with 1013 (slow consumer or overload).",
            node.closes.get(int(CloseCode.TRY_AGAIN_LATER), 0),
        )

        handler_errors: int | None = getattr(broker, "handler_errors", None)
        if handler_errors is not None:
            yield counter(
                "broker_handler_errors",
                "Exceptions raised by the node's handlers of broker events (bugs; each logged).",
                handler_errors,
            )

        # NATS only: how often its per-channel chains of appends held (see docs/deployment.md).
        chains: tuple[int, int] | None = getattr(broker, "append_chains", None)
        if chains is not None:
            whole, broken = chains
            yield counter(
                "broker_append_chains",
                "Chains of appends to one channel sent whole to NATS (several in flight).",
                whole,
            )
            yield counter(
                "broker_append_chain_breaks",
                "Chains broken by another append to the stream in between (their rest sent again "
                "in order; many of them mean the node appends one at a time for a while).",
                broken,
            )

        state = GaugeMetricFamily(
            f"{PREFIX}_broker_state",
            "1 for the broker connection's current state, 0 for the others.",
            labels=["node", "state"],
        )
        current = broker.state
        for candidate in BrokerState:
            state.add_metric([node.node_id, candidate.value], float(candidate is current))
        yield state


class NodeMetrics:
    """The metrics of one node: its registry, collector and latency histogram.

    Create it once per node with `install`; the caller's duty is to not install two on the same
    node (the hub has one `on_delivered` hook, and the second would replace the first).
    """

    def __init__(self, node: MeteredNode) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(NodeCollector(node))
        self.latency = Histogram(
            f"{PREFIX}_publish_to_send_seconds",
            "Seconds from a publication's broker timestamp to its frames being queued to this "
            "node's followers (observed once per publication delivered here).",
            labelnames=["node"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._observe = self.latency.labels(node=node.node_id).observe

    def on_delivered(self, publication: Publication, subscribers: int) -> None:
        """The hub's hook: observe the latency of one publication delivered on this node.

        Every publication counts, whatever `subscribers` says: the node hears only channels it
        has followers of (broker subscriptions are reference-counted), and the hub's count leaves
        out followers still joining, which do get the frame.
        """
        # Another node's clock may run ahead of ours: never record a negative latency.
        self._observe(max(0.0, time.time() - publication.published_at))

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics``."""
        response = web.Response(body=self.exposition())
        # CONTENT_TYPE_LATEST carries its own charset and version parameters.
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


def install(app: web.Application, node: MeteredNode) -> NodeMetrics:
    """Add ``GET /metrics`` to the internal API `app` and hook the latency histogram into `node`.

    The API's auth middleware guards the route (see `http_api.METRICS_PATH`); call once per node.
    """
    metrics = NodeMetrics(node)
    node.hub.on_delivered = metrics.on_delivered
    app.router.add_get("/metrics", metrics.handle)
    return metrics
