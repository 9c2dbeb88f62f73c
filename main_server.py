"""MiniTorrent main server: shares a catalog of files in verified chunks.

    python main_server.py [--config PATH] [--headless] [--add FILE ...]

``--add`` imports files into the server's data folder (see catalog.py for the
naming rules), then the server serves until SIGINT or SIGTERM. Without
``--headless`` it opens the main server's window (gui/main_window.py), which
starts serving and imports the ``--add`` files with a progress bar. If a main
server already runs on that data folder, ``--add`` adds the files to its
catalog (it notices within a second and replicates them) and exits.

The engine, ``MainServer``, imports no tkinter: a window (or a test) holds one
and calls its methods. With ``server.secret`` set it replicates to the backup
and sends it heartbeats; see docs/failover.md for the roles and epochs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from error_handler import MiniTorrentError
from minitorrent.common.daemon import build_engine, serve_until_signalled
from minitorrent.server.main import MainServer

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniTorrent main server: share files on the LAN.")
    parser.add_argument("--config", help="path to config.yaml (default: the one beside this program)")
    parser.add_argument("--headless", action="store_true", help="run without a window")
    parser.add_argument("--geometry", metavar="WxH+X+Y", help="the window's size and place on screen")
    parser.add_argument("--add", nargs="+", metavar="FILE", default=[], help="files to share")
    return parser.parse_args(argv)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
