"""MiniTorrent main server: shares a catalog of files in verified chunks.

    python main_server.py [--config PATH] [--headless] [--add FILE ...]
    python main_server.py [--config PATH] pair | paired | revoke ID

``--add`` imports files into the server's data folder (see catalog.py for the
naming rules), then the server serves until SIGINT or SIGTERM. Without
``--headless`` it opens the main server's window (gui/main_window.py), which
starts serving and imports the ``--add`` files with a progress bar. If a main
server already runs on that data folder, ``--add`` adds the files to its
catalog (it notices within a second and replicates them) and exits.

The engine, ``MainServer``, imports no tkinter: a window (or a test) holds one
and calls its methods. With a backup configured it replicates to it and sends
it heartbeats (see docs/failover.md). ``pair`` shows a one-time code that
lets one client pair (``server.access: paired``), ``paired`` lists the paired
clients and ``revoke`` removes one; see docs/security.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Sequence

from config_loader import load_config
from error_handler import MiniTorrentError
from minitorrent.common.daemon import build_engine, serve_until_signalled
from minitorrent.server.access import CODE_TTL_S, AccessList, wait_for_pairing
from minitorrent.server.main import MainServer
from minitorrent.wire.identity import parse_id

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniTorrent main server: share files on the LAN.")
    parser.add_argument("--config", help="path to config.yaml (default: the one beside this program)")
    parser.add_argument("--headless", action="store_true", help="run without a window")
    parser.add_argument("--geometry", metavar="WxH+X+Y", help="the window's size and place on screen")
    parser.add_argument("--add", nargs="+", metavar="FILE", default=[], help="files to share")
    parser.add_argument("command", nargs="?", choices=ACCESS_COMMANDS,
                        help="pair: show a one-time code for a client (server.access: paired); "
                             "paired: list the paired clients; revoke ID: stop accepting a client")
    parser.add_argument("identity", nargs="?", help="the client identity to revoke")
    args = parser.parse_args(argv)
    if (args.command == "revoke") != (args.identity is not None):
        parser.error("revoke takes one client identity; the other commands none")
    return args


def add_files(engine: MainServer, paths: Sequence[str]) -> bool:
    """Import each file, printing one line per file; False if any failed."""
    ok = True
    for path in paths:
        try:
            result = engine.add_file(path)
        except MiniTorrentError as error:
            print(f"error: {error}", file=sys.stderr)
            ok = False
            continue
        record = result.record
        print(f"{result.outcome}: {record.name} ({record.size} bytes, sha256 {record.sha256[:12]})", flush=True)
    return ok


def start_banner(engine: MainServer) -> str:
    """Start the engine; the line that says where it listens."""
    host, port = engine.start()
    count, total = engine.catalog.count_files()
    return (f"main server listening on {host}:{port} with {count} files ({total} bytes), "
            f"identity {engine.identity.id}")


def run_access_command(args: argparse.Namespace) -> int:
    """``pair``, ``paired`` or ``revoke ID`` on the main's data folder (the running server sees the change)."""
    try:
        config = load_config(args.config)
        access = AccessList(config.server.main.data_dir)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return ACCESS_COMMANDS[args.command](access, args)
    finally:
        access.close()


def run_pair(access: AccessList, args: argparse.Namespace) -> int:
    code = access.offer_code()
    print(f"pairing code: {code}  (one attempt, {CODE_TTL_S / 60:g} minutes); on the client run: "
          f"python client.py pair {code}", flush=True)
    try:
        identity = wait_for_pairing(access, code, threading.Event())
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"paired client {identity}", flush=True)
    return 0


def run_paired(access: AccessList, args: argparse.Namespace) -> int:
    clients = access.paired()
    for identity, added_at in clients:
        print(f"{identity}  paired {time.strftime('%Y-%m-%d %H:%M', time.localtime(added_at))}")
    if not clients:
        print("no paired clients")
    return 0


def run_revoke(access: AccessList, args: argparse.Namespace) -> int:
    try:
        identity = parse_id(args.identity)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not access.revoke(identity):
        print(f"error: {identity} is not a paired client", file=sys.stderr)
        return 1
    print(f"revoked {identity}", flush=True)
    return 0


ACCESS_COMMANDS = {"pair": run_pair, "paired": run_paired, "revoke": run_revoke}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command:
        return run_access_command(args)
    engine = build_engine(args.config, "main_server", MainServer)
    if engine is None:
        return 2
    if not args.headless and not (args.add and _folder_taken(engine)):
        return run_window(engine, args.add, args.geometry)  # with --add and a main already running: add to it, as headless
    added_ok = add_files(engine, args.add)
    if not added_ok or (args.add and _already_running(engine)):
        engine.catalog.close()
        return 0 if added_ok else 1
    try:
        serve_until_signalled(lambda: start_banner(engine), engine.stop, "main server")
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        engine.catalog.close()
        return 1
    return 0


def run_window(engine: MainServer, add: Sequence[str], geometry: str | None = None) -> int:
    """Open the main server's window (which starts serving and imports ``add``); 2 if there is no display."""
    from minitorrent.gui.base import (  # tkinter only when a window is wanted
        NoDisplay,
        no_display_hint,
        open_root,
    )
    from minitorrent.gui.main_window import DEFAULT_GEOMETRY, run

    settings_file = engine.catalog.data_dir / "window.json"
    try:
        root = open_root("MiniTorrent main server", geometry or DEFAULT_GEOMETRY, settings_file)
    except NoDisplay:
        engine.catalog.close()
        return no_display_hint("main_server.py")
    return run(engine, root, settings_file, add)


def _folder_taken(engine: MainServer) -> bool:
    """True if another main server holds this data folder."""
    if engine.lock.acquire():
        engine.lock.release()
        return False
    return True


def _already_running(engine: MainServer) -> bool:
    """True (and says so) if another main server holds this data folder: it will share the files."""
    if not _folder_taken(engine):
        return False
    print("the main server already running on this data folder now shares them", flush=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
