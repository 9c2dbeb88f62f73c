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
from typing import Sequence

from error_handler import MiniTorrentError
from minitorrent.common.daemon import build_engine, serve_until_signalled
from minitorrent.server.backup import BackupServer

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.1  # how often the backup checks the time since the last heartbeat


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
            f"{count} files), identity {engine.identity.id}")


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
    from minitorrent.gui.backup_window import DEFAULT_GEOMETRY, run
    from minitorrent.gui.base import (  # tkinter only when a window is wanted
        NoDisplay,
        no_display_hint,
        open_root,
    )

    settings_file = engine.catalog.data_dir / "window.json"
    try:
        root = open_root("MiniTorrent backup server", geometry or DEFAULT_GEOMETRY, settings_file)
    except NoDisplay:
        engine.stop()
        return no_display_hint("backup_server.py")
    return run(engine, root, settings_file)


if __name__ == "__main__":
    sys.exit(main())
