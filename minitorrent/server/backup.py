"""The backup server's engine: a replica that watches heartbeats, takes over, and hands the role back.
"""
from __future__ import annotations

import logging
import threading
import time

from config_loader import Config
from minitorrent.server.access import receive_paired_list
from minitorrent.server.engine import ServerEngine
from minitorrent.server.replication import ReplicaReceiver
from minitorrent.server.roles import Role
from minitorrent.wire import protocol
from minitorrent.wire.protocol import Frame

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.1  # how often the backup checks the time since the last heartbeat


class BackupServer(ServerEngine):
    """The backup's engine: replica catalog, role, heartbeat monitor and request server.

    ``start``/``stop`` from one controlling thread; ``promote_now`` and
    ``approve_handback`` from any thread (a window's buttons, a signal).
    """

    def __init__(self, config: Config) -> None:
        settings = config.server.backup
        self.heartbeat_timeout_s = settings.heartbeat_timeout
        self.heartbeat_interval_s = settings.heartbeat_interval
        self._handback_asked_at: float | None = None
        self._lock = threading.Lock()
        self._last_heartbeat = time.monotonic()  # counting starts at start-up: the main gets a full timeout
        self._main_address = f"{config.server.main.host}:{config.server.main.port}"
        super().__init__(config, "backup", settings)
        self.server.secret = self.secret  # what the main must prove (the cluster key file if server.secret is empty)
        self.receiver = ReplicaReceiver(self.catalog, self.node, settings.failback, lambda: self._main_address)
        self.receiver.on_change = lambda: self.metrics.set_downloads(self.catalog.download_counts())
        self.server.peer_handlers.update(self.receiver.handlers())  # the receiver needs our catalog: added now
        self.server.peer_handlers.update({protocol.Heartbeat: self._on_heartbeat,
                                          protocol.HandOver: self._on_hand_over,
                                          protocol.PairedClients: receive_paired_list(self.access)})
        self._monitor = threading.Thread(target=self._watch_heartbeats, name="heartbeat-monitor", daemon=True)

    def start(self) -> tuple[str, int]:
        """Listen and start watching heartbeats; returns the bound (host, port)."""
        address = self._listen()
        with self._lock:
            self._last_heartbeat = time.monotonic()
        self._monitor.start()
        return address

    def _stop_workers(self) -> None:
        if self._monitor.is_alive():
            self._monitor.join()
        self.receiver.close()

    def seconds_since_heartbeat(self) -> float:
        """Time since the last heartbeat from a current main (or since start-up)."""
        with self._lock:
            return time.monotonic() - self._last_heartbeat

    def seconds_since_handback_request(self) -> float | None:
        """Time since the main last asked for the active role back (None: never); any thread."""
        with self._lock:
            return None if self._handback_asked_at is None else time.monotonic() - self._handback_asked_at

    def replication_in_progress(self) -> list[dict]:
        """Files being received from the main now: name, size, chunks, chunks_done (any thread)."""
        receiver = self.receiver
        with receiver._lock:  # the receiver's own table of open partial files (read-only here)
            states = [partial.state for partial in receiver._open.values()]
        return [{"name": state.name, "size": state.manifest.size, "chunks": state.manifest.chunk_count,
                 "chunks_done": len(state.verified)} for state in states]

    def promote_now(self) -> int:
        """Manual failover: become active at once; returns the new epoch."""
        return self.node.promote("promoted by the operator")

    def approve_handback(self) -> None:
        """With ``failback: manual``: let the main take the active role back."""
        log.info("the operator approved handing the active role back to the main")
        self.receiver.handback_approved.set()

    def _watch_heartbeats(self) -> None:
        while not self.stop_event.wait(MONITOR_INTERVAL_S):
            silent_s = self.seconds_since_heartbeat()
            if self.node.role is Role.STANDBY and silent_s > self.heartbeat_timeout_s:
                self.node.promote(f"no heartbeat from the main for {silent_s:.1f} s")

    def _main_is_alive(self, address: str = "") -> None:
        with self._lock:
            self._last_heartbeat = time.monotonic()
            if address:
                self._main_address = address

    def _on_heartbeat(self, handler, frame: Frame) -> None:
        beat: protocol.Heartbeat = frame.message
        self.node.observe_epoch(beat.epoch, "the main's heartbeat", primary=beat.address)
        if beat.epoch >= self.node.epoch:  # a current main; a stale one is answered but not trusted
            self._main_is_alive(beat.address)
            self.node.follow(beat.epoch, beat.address)
        handler.connection.send(protocol.HeartbeatAck(self.node.role.value, self.node.epoch))

    def _on_hand_over(self, handler, frame: Frame) -> None:
        with self._lock:
            self._handback_asked_at = time.monotonic()
        self._main_is_alive()  # first: once we stand down, the monitor must not count the main's silence
        self.receiver.hand_over(handler, frame)

    def main_link(self) -> dict:
        """What this backup knows of the main, as status replies show it (any thread)."""
        return self._status_extra()["main"]

    def _status_extra(self) -> dict:
        return {"main": {"address": self._main_address,
                         "seconds_since_heartbeat": round(self.seconds_since_heartbeat(), 3),
                         "heartbeat_timeout_s": self.heartbeat_timeout_s,
                         "failback": self.receiver.failback}}
