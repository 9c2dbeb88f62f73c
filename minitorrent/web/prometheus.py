"""/metrics in the Prometheus text format, read from the engine's counters at scrape time.

The counters themselves stay in ``metrics.Metrics`` (one mechanism); this
collector only translates a snapshot, so a scrape costs a few dict reads.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from minitorrent.server.engine import ServerEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TOP_FILES = 100  # per-file series kept: a label per file of a huge catalog would swamp Prometheus


class EngineCollector:
    """Yields the engine's and the web face's figures as metric families."""

    def __init__(self, engine: ServerEngine, http_snapshot: Callable[[], dict],
                 http_requests: Callable[[], dict[str, int]], bittorrent_peers: Callable[[], int]) -> None:
        self._engine = engine
        self._http_snapshot = http_snapshot
        self._http_requests = http_requests
        self._bittorrent_peers = bittorrent_peers

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        proto, http = engine.metrics.snapshot(top_files=TOP_FILES), self._http_snapshot()
        yield _gauge("minitorrent_uptime_seconds", "Seconds since the server started.", proto["uptime_s"])
        yield from _traffic(proto, http)
        yield from _requests(proto, self._http_requests())
        yield _per_file(proto["downloads_per_file"])
        yield from _role(engine)
        yield _replication_lag(engine.server.status_extra() if engine.server.status_extra else {})
        peers = GaugeMetricFamily("minitorrent_peers", "Peers the trackers know now, by swarm.",
                                  labels=["swarm"])
        tracker = engine.server.tracker
        peers.add_metric(["minitorrent"], tracker.peer_count() if tracker else 0)
        peers.add_metric(["bittorrent"], self._bittorrent_peers())
        yield peers


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _traffic(proto: dict, http: dict) -> Iterator[Metric]:
    sent = CounterMetricFamily("minitorrent_sent_bytes", "Bytes sent, by channel.", labels=["channel"])
    sent.add_metric(["protocol"], proto["bytes_sent"])
    sent.add_metric(["http"], http["bytes_sent"])
    yield sent
    received = CounterMetricFamily("minitorrent_received_bytes", "Bytes received on the protocol channel.")
    received.add_metric([], proto["bytes_received"])
    yield received
    active = GaugeMetricFamily("minitorrent_active_connections", "Connections being served now, by channel.",
                               labels=["channel"])
    active.add_metric(["protocol"], proto["active_connections"])
    active.add_metric(["http"], http["active_connections"])
    yield active


def _requests(proto: dict, http_by_kind: dict[str, int]) -> Iterator[Metric]:
    requests = CounterMetricFamily("minitorrent_requests", "Requests answered, by channel and kind.",
                                   labels=["channel", "kind"])
    requests.add_metric(["protocol", "ok"], proto["requests_total"] - proto["requests_failed"])
    requests.add_metric(["protocol", "failed"], proto["requests_failed"])
    for kind, count in sorted(http_by_kind.items()):
        requests.add_metric(["http", kind], count)
    yield requests


def _per_file(downloads: dict[str, int]) -> Metric:
    family = CounterMetricFamily("minitorrent_file_downloads",
                                 f"Completed downloads per file (the {TOP_FILES} most downloaded).", labels=["file"])
    for name, count in downloads.items():
        family.add_metric([name], count)
    return family


def _role(engine: ServerEngine) -> Iterator[Metric]:
    role = GaugeMetricFamily("minitorrent_role", "1 for the role this server holds now.", labels=["role"])
    for candidate in ("active", "standby"):
        role.add_metric([candidate], 1 if engine.node.role.value == candidate else 0)
    yield role
    yield _gauge("minitorrent_epoch", "The epoch this server holds.", engine.node.epoch)


def _replication_lag(extra: dict) -> Metric:
    """The main's view of its backup (bytes and files still to send) or the backup's of its main."""
    lag = GaugeMetricFamily("minitorrent_replication_lag", "How far the replica is behind, by unit.",
                            labels=["unit"])
    backup = extra.get("backup", {})
    if backup.get("replicating"):
        lag.add_metric(["bytes"], backup.get("bytes_pending", 0))
        lag.add_metric(["files"], backup.get("files_pending", 0))
        lag.add_metric(["seconds"], backup.get("oldest_pending_s", 0.0))
    main = extra.get("main")
    if main:
        lag.add_metric(["seconds_since_heartbeat"], main.get("seconds_since_heartbeat", 0.0))
    return lag


def render(collector: EngineCollector) -> bytes:
    """The exposition text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
