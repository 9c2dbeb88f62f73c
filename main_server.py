"""MiniTorrent main server: shares a catalog of files in verified chunks.

    python main_server.py [--config PATH] [--headless] [--add FILE ...]

``--add`` imports files into the server's data folder (see catalog.py for the
naming rules), then the server serves until SIGINT or SIGTERM. The engine,
``MainServer``, imports no tkinter: a window (or a test) holds one and calls
its methods.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from catalog import AddResult, Catalog
from config_loader import Config, load_config
from error_handler import MiniTorrentError
from logger_config import setup_logging
from metrics import Metrics
from serving import RequestServer

log = logging.getLogger(__name__)


class MainServer:
    """The main server's engine: catalog, metrics and the request server.

    ``start``/``stop`` may be called from any one controlling thread;
    ``add_file`` from any thread (imports run in the caller's thread).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        settings = config.server.main
        self.catalog = Catalog(settings.data_dir, config.transfer.chunk_size)
        self.metrics = Metrics()
        self.metrics.set_downloads(self.catalog.download_counts())
        self.server = RequestServer(
            self.catalog,
            host=settings.host,
            port=settings.port,
            role="main",
            max_connections=config.transfer.max_connections,
            idle_timeout_s=config.transfer.idle_timeout,
            io_timeout_s=config.transfer.io_timeout,
            metrics=self.metrics,
        )

    def add_file(self, path: str | Path, on_progress: Callable[[int], None] | None = None) -> AddResult:
        """Import one file into the catalog; raises ``CatalogError`` on bad input."""
        return self.catalog.add_file(path, on_progress)

    def start(self) -> tuple[str, int]:
        """Start serving; returns the bound (host, port)."""
        return self.server.start()

    def stop(self) -> None:
        """Stop serving and close the catalog."""
        self.server.stop()
        self.catalog.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniTorrent main server: share files on the LAN.")
    parser.add_argument("--config", help="path to config.yaml (default: the one beside this program)")
    parser.add_argument("--headless", action="store_true", help="run without a window")
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


def serve_until_signalled(engine: MainServer) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    host, port = engine.start()
    count, total = engine.catalog.count_files()
    print(f"main server listening on {host}:{port} with {count} files ({total} bytes)", flush=True)
    stop.wait()
    engine.stop()
    print("main server stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        setup_logging(config.logging, "main_server")
        engine = MainServer(config)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.headless:
        log.warning("the main server window is not built yet; running headless")
    if not add_files(engine, args.add):
        engine.catalog.close()
        return 1
    try:
        serve_until_signalled(engine)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        engine.catalog.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
