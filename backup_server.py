"""MiniTorrent backup server: a full replica that takes over when the main goes silent.

    python backup_server.py [--config PATH] [--headless]
    python backup_server.py [--config PATH] [--add FILE ...] [--remove PATH ...] [--rename OLD NEW]
                                                                   # beside a running, active backup
    python backup_server.py [--config PATH] token    # the operator's token for the web face (docs/http.md)

It listens on ``server.backup.port`` for both the main's authenticated peer
links (heartbeats and replication) and for clients. On standby it refuses
client requests with a STANDBY error naming the primary. When no heartbeat
has arrived for ``heartbeat_timeout`` seconds it promotes itself (a new,
persisted epoch) and serves clients from its replica. When the main returns
it catches up and asks for the role back; with ``failback: manual`` the
backup waits for its operator: SIGUSR1 to the headless process, or the
window's Hand back to main button. Without ``--headless`` the program opens
the backup's window (gui/backup_window.py). See docs/failover.md.

``--add``, ``--remove`` and ``--rename`` beside a running backup that is
*active* change what it shares (exit 1 on standby: the main is the authority
then). When the main takes the role back it fetches what was added and
removes what was removed or renamed away, unless it changed that name itself
later (epochs decide; see minitorrent/server/failback.py).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Sequence

from config_loader import load_config
from error_handler import MiniTorrentError
from minitorrent.common.daemon import build_engine, edit_catalog, serve_until_signalled
from minitorrent.net import remote
from minitorrent.server.backup import BackupServer
from minitorrent.server.access import AccessList
from minitorrent.server.engine import operator_token, peer_tls
from minitorrent.web.face import start_with_face, stop_with_face, web_face_for

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniTorrent backup server: a replica that takes over.")
    parser.add_argument("--config", help="path to config.yaml (default: the one beside this program)")
    parser.add_argument("--headless", action="store_true", help="run without a window")
    parser.add_argument("--geometry", metavar="WxH+X+Y", help="the window's size and place on screen")
    parser.add_argument("--add", nargs="+", metavar="FILE", default=[],
                        help="files to share from the running backup while it is active")
    parser.add_argument("--remove", nargs="+", metavar="PATH", default=[],
                        help="shared files or folders the running, active backup stops sharing")
    parser.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"),
                        help="rename a shared file or folder on the running, active backup")
    parser.add_argument("command", nargs="?", choices=["token"],
                        help="token: print the operator's token for the web face (server.access: paired)")
    return parser.parse_args(argv)


def run_token(config_path: str | None) -> int:
    """The operator's token, alone on stdout (the same as the main's when they share the cluster secret)."""
    try:
        config = load_config(config_path)
        access = AccessList(config.server.backup.data_dir)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        print(operator_token(config, "backup", access))
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        access.close()
    return 0


def start_banner(engine: BackupServer) -> str:
    """Start the engine; the line that says where it listens and in which role."""
    host, port = engine.start()
    count, _ = engine.catalog.count_files()
    return (f"backup server listening on {host}:{port} ({engine.node.role.value}, epoch {engine.node.epoch}, "
            f"{count} files), identity {engine.identity.id}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "token":
        return run_token(args.config)
    engine = build_engine(args.config, "backup_server", BackupServer)
    if engine is None:
        return 2
    if args.add or args.remove or args.rename:
        return edit_running_backup(engine, args.add, args.remove, args.rename)
    if not args.headless:
        return run_window(engine, args.geometry)
    face = web_face_for(engine, engine.config)
    try:
        serve_until_signalled(lambda: start_with_face(lambda: start_banner(engine), face),
                              lambda: stop_with_face(engine.stop, face), "backup server",
                              {signal.SIGUSR1: engine.approve_handback})
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        engine.catalog.close()
        return 1
    return 0


def edit_running_backup(engine: BackupServer, add: Sequence[str], remove: Sequence[str],
                        rename: Sequence[str] | None) -> int:
    """Add, remove and rename in the catalog of the backup running on this data folder, if it is active;
    the exit status."""
    try:
        if engine.lock.acquire():
            engine.lock.release()
            print("error: no backup server runs on this data folder: editing its catalog needs a running, "
                  "active backup", file=sys.stderr)
            return 1
        if not _running_backup_active(engine):
            return 1
        ok = all([_add_each(engine, add), edit_catalog(engine, remove, rename)])
        # Stepped down meanwhile: the main, now the authority, would not see what changed after its catch-up.
        return 0 if ok and _running_backup_active(engine) else 1
    finally:
        engine.catalog.close()


def _add_each(engine: BackupServer, paths: Sequence[str]) -> bool:
    """Add each file, one line each; False if any failed."""
    ok = True
    for path in paths:
        try:
            record = engine.catalog.add_file(path).record
        except MiniTorrentError as error:
            print(f"error: {error}", file=sys.stderr)
            ok = False
            continue
        print(f"added: {record.name} ({record.size} bytes, sha256 {record.sha256[:12]})", flush=True)
    return ok


def _running_backup_active(engine: BackupServer) -> bool:
    """True if the backup at ``server.backup``'s address says it is active; else says why on stderr."""
    settings = engine.config.server.backup
    status = remote.status_of((settings.host, settings.port), engine.config.transfer.io_timeout,
                              peer_tls(engine.config)) or {}  # over TLS, expecting our own identity if configured
    if status.get("role") == "active":
        return True
    print(f"error: the backup is not active ({status.get('role', 'no answer')}): change the catalog on the main",
          file=sys.stderr)
    return False


def run_window(engine: BackupServer, geometry: str | None = None) -> int:
    """Open the backup's window (which starts the engine); 2 if there is no display."""
    from minitorrent.gui.backup_window import DEFAULT_GEOMETRY, run
    from minitorrent.gui.base import (  # tkinter only when a window is wanted
        NoDisplay,
        no_display_hint,
        open_root,
    )
    from minitorrent.gui.shell import TITLES

    settings_file = engine.catalog.data_dir / "window.json"
    try:
        root = open_root(TITLES["backup"], geometry or DEFAULT_GEOMETRY, settings_file)
    except NoDisplay:
        engine.stop()
        return no_display_hint("backup_server.py")
    face = web_face_for(engine, engine.config)
    try:
        start_with_face(str, face)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        root.destroy()
        engine.stop()
        return 1
    try:
        return run(engine, root, settings_file)
    finally:
        stop_with_face(lambda: None, face)


if __name__ == "__main__":
    sys.exit(main())
