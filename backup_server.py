"""MiniTorrent backup server: a full replica that takes over when the main goes silent.

    python backup_server.py [--config PATH] [--headless]

It listens on ``server.backup.port`` for both the main's authenticated peer
links (heartbeats and replication) and for clients. On standby it refuses
client requests with a STANDBY error naming the primary. When no heartbeat
has arrived for ``heartbeat_timeout`` seconds it promotes itself (a new,
persisted epoch) and serves clients from its replica. When the main returns
it catches up and asks for the role back; with ``failback: manual`` the
backup waits for its operator: SIGUSR1 to the headless process, or the
window's Hand back to main button. Without ``--headless`` the program opens
the backup's window (gui/backup_window.py). See docs/failover.md.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Sequence

import protocol
from cluster import Role
from config_loader import Config
from daemon import build_engine, serve_until_signalled
from error_handler import ConfigError, MiniTorrentError
from protocol import Frame
from replication import ReplicaReceiver
from server_engine import ServerEngine

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.1  # how often the backup checks the time since the last heartbeat


class BackupServer(ServerEngine):
    """The backup's engine: replica catalog, role, heartbeat monitor and request server.

    ``start``/``stop`` from one controlling thread; ``promote_now`` and
    ``approve_handback`` from any thread (a window's buttons, a signal).
    """

    def __init__(self, config: Config) -> None:
        if not config.server.secret:
            raise ConfigError("server.secret: must be set for the backup (the main proves it before replicating)")
        settings = config.server.backup
        self.heartbeat_timeout_s = settings.heartbeat_timeout
        self.heartbeat_interval_s = settings.heartbeat_interval
        self._handback_asked_at: float | None = None
        self._lock = threading.Lock()
        self._last_heartbeat = time.monotonic()  # counting starts at start-up: the main gets a full timeout
        self._main_address = f"{config.server.main.host}:{config.server.main.port}"
        super().__init__(config, "backup", settings, secret=config.server.secret)
        self.receiver = ReplicaReceiver(self.catalog, self.node, settings.failback, lambda: self._main_address)
        self.receiver.on_change = lambda: self.metrics.set_downloads(self.catalog.download_counts())
        self.server.peer_handlers.update(self.receiver.handlers())  # the receiver needs our catalog: added now
        self.server.peer_handlers.update({protocol.Heartbeat: self._on_heartbeat,
                                          protocol.HandOver: self._on_hand_over})
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniTorrent backup server: a replica that takes over.")
    parser.add_argument("--config", help="path to config.yaml (default: the one beside this program)")
    parser.add_argument("--headless", action="store_true", help="run without a window")
    parser.add_argument("--geometry", metavar="WxH+X+Y", help="the window's size and place on screen")
    return parser.parse_args(argv)


def start_banner(engine: BackupServer) -> str:
    """Start the engine; the line that says where it listens and in which role."""
    host, port = engine.start()
    count, _ = engine.catalog.count_files()
    return (f"backup server listening on {host}:{port} ({engine.node.role.value}, epoch {engine.node.epoch}, "
            f"{count} files)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engine = build_engine(args.config, "backup_server", BackupServer)
    if engine is None:
        return 2
    if not args.headless:
        return run_window(engine, args.geometry)
    try:
        serve_until_signalled(lambda: start_banner(engine), engine.stop, "backup server",
                              {signal.SIGUSR1: engine.approve_handback})
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        engine.catalog.close()
        return 1
    return 0


def run_window(engine: BackupServer, geometry: str | None = None) -> int:
    """Open the backup's window (which starts the engine); 2 if there is no display."""
    from gui.base import NoDisplay, no_display_hint, open_root  # tkinter only when a window is wanted
    from gui.backup_window import DEFAULT_GEOMETRY, run

    settings_file = engine.catalog.data_dir / "window.json"
    try:
        root = open_root("MiniTorrent backup server", geometry or DEFAULT_GEOMETRY, settings_file)
    except NoDisplay:
        engine.stop()
        return no_display_hint("backup_server.py")
    return run(engine, root, settings_file)


if __name__ == "__main__":
    sys.exit(main())
