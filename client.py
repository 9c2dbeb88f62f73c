"""MiniTorrent client: browse the catalog and download verified files.

    python client.py [--config PATH] [--geometry WxH+X+Y]   # the window (gui/client_window.py)
    python client.py [--config PATH] list [--json] [--search TEXT]
    python client.py [--config PATH] get NAME|FOLDER/ [...] [--output DIR]
    python client.py [--config PATH] status [--json]
    python client.py [--config PATH] seed
    python client.py [--config PATH] servers [--json] [--seconds S]
    python client.py [--config PATH] pair CODE
    python client.py [--config PATH] token      # this paired client's token for the web face

Exit status: 0 on success, 1 when a command failed (the reason is one line on
stderr), 2 for a bad command line or configuration (or no display for the
window), 130 when interrupted. When no server answers at once, a command says
on stderr what it waits for and for how long before it waits. A reader that
stops early (``client.py status | head -1``) ends the command quietly, status 0.
``ClientEngine`` is what the window holds; it imports no tkinter.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from config_loader import load_config
from error_handler import ConnectionFailed, MiniTorrentError
from logger_config import setup_logging
from minitorrent.client.engine import ClientEngine, server_addresses
from minitorrent.client.folders import summarize_folders
from minitorrent.client.progress import TerminalProgress, describe_sources
from minitorrent.common.daemon import serve_until_signalled
from minitorrent.common.units import human_size
from minitorrent.net.discovery import LISTEN_S, browse

log = logging.getLogger(__name__)

MAX_LISTEN_S = 60.0


def window_geometry(text: str) -> str:
    """``--geometry``: a Tk geometry, ``WxH``, ``WxH+X+Y`` or ``+X+Y``; argparse's error otherwise."""
    if not re.fullmatch(r"(\d+x\d+)?([+-]\d+[+-]\d+)?", text) or not text:
        raise argparse.ArgumentTypeError(f"expected WxH+X+Y (for example 1280x820+0+0), got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MiniTorrent client: browse and download shared files.")
    parser.add_argument("--config", help="path to config.yaml (default: the one beside this program)")
    parser.add_argument("--geometry", metavar="WxH+X+Y", type=window_geometry,
                        help="the window's size and place on screen (no COMMAND)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("list", help="list the shared files")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--search", default="", metavar="TEXT", help="only names containing TEXT (any case)")
    get = commands.add_parser("get", help="download files by name, or whole folders (NAME ending with /)")
    get.add_argument("names", nargs="+", metavar="NAME")
    get.add_argument("--output", type=Path, metavar="DIR", help="folder to save into (default: client.download_dir)")
    status = commands.add_parser("status", help="show the server's status and metrics")
    status.add_argument("--json", action="store_true", help="print JSON")
    commands.add_parser("seed", help="seed the files this client downloaded to other clients, until stopped")
    servers = commands.add_parser("servers", help="list the servers announced on the LAN (mDNS)")
    servers.add_argument("--json", action="store_true", help="print JSON")
    servers.add_argument("--seconds", type=float, default=LISTEN_S, metavar="S",
                         help=f"how long to listen (default {LISTEN_S:g})")
    pair = commands.add_parser("pair", help="pair with the server using the one-time code its operator gave you")
    pair.add_argument("code", metavar="CODE")
    commands.add_parser("token", help="print this paired client's token for the server's web face "
                                      "(server.access: paired): paste it into the page, or add ?token= to links")
    return parser


def run_list(engine: ClientEngine, args: argparse.Namespace) -> int:
    entries = engine.list_files(args.search)
    if args.json:
        print(json.dumps(entries, ensure_ascii=False, indent=2))
        return 0
    if not entries:
        print("no files" + (f" matching {args.search!r}" if args.search else ""))
        return 0
    folders = summarize_folders(entries)
    if folders:
        print(f"{'FOLDER':40}  {'SIZE':>10}  {'FILES':>6}")
        for folder in folders:
            print(f"{folder.path:40}  {human_size(folder.size):>10}  {folder.files:>6}")
        print()
    print(f"{'NAME':40}  {'SIZE':>10}  {'CHUNKS':>6}  {'DOWNLOADS':>9}  SHA256")
    for entry in entries:
        print(f"{entry['name']:40}  {human_size(entry['size']):>10}  {entry['chunks']:>6}  "
              f"{entry['downloads']:>9}  {entry['sha256'][:16]}")
    return 0


def run_get(engine: ClientEngine, args: argparse.Namespace) -> int:
    try:
        engine.start_seeding()  # while downloading, already verified chunks help the crowd
    except MiniTorrentError as error:  # seeding is a bonus here, not a reason to fail the download
        print(f"warning: not seeding: {error}", file=sys.stderr)
    failed = 0
    for name in args.names:
        if name.endswith("/"):
            failed += get_folder(engine, name, args.output)
            continue
        try:
            result = engine.download(name, args.output)
        except MiniTorrentError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        resumed = f", {result.resumed_chunks} chunks resumed" if result.resumed_chunks else ""
        print(f"{result.outcome}: {result.path} ({human_size(result.size)}, every chunk verified{resumed}"
              f", {describe_sources(result.sources) or 'nothing fetched'})", flush=True)
    return 1 if failed else 0


def get_folder(engine: ClientEngine, folder: str, output: Path | None) -> int:
    """Download a folder, printing one summary line and one line per file that failed; 1 if any failed."""
    try:
        result = engine.download_folder(folder, output)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for line in result.failed:
        print(f"error: {line}", file=sys.stderr)
    print(f"{result.folder}: {result.downloaded} downloaded, {result.present} already present, "
          f"{len(result.failed)} failed, of {result.files} files ({human_size(result.size)}, sha256 verified) "
          f"into {result.path}", flush=True)
    return 1 if result.failed else 0


def run_status(engine: ClientEngine, args: argparse.Namespace) -> int:
    snapshot = engine.status()
    snapshot["client_identity"] = engine.identity.id
    if args.json:
        print(json.dumps(snapshot, ensure_ascii=False, indent=2))
        return 0
    print(f"this client's identity: {engine.identity.id}")
    print(f"{snapshot.get('server', 'server')} server at {snapshot.get('address')}: "
          f"{snapshot.get('role')}, epoch {snapshot.get('epoch')}, identity {snapshot.get('identity') or '(no TLS)'}")
    per_file = snapshot.pop("downloads_per_file", {})
    for key, value in flatten(snapshot):
        print(f"{key:32} {value}")
    for name, count in per_file.items():
        print(f"  downloads of {name}: {count}")
    return 0


def flatten(mapping: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, value) pairs, for printing one per line."""
    pairs: list[tuple[str, object]] = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            pairs.extend(flatten(value, f"{prefix}{key}."))
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def run_seed(engine: ClientEngine, args: argparse.Namespace) -> int:
    if engine.seeder is None:
        print("error: client.seeding is false in the config; nothing to do", file=sys.stderr)
        return 2

    def start() -> str:
        host, port = engine.start_seeding()
        count, total = engine.seeder.source.count_files()
        return f"seeding {count} files ({human_size(total)}) on {host}:{port}, identity {engine.identity.id}"

    def report() -> None:
        uploaded = engine.seeder.metrics.snapshot()
        print(f"uploaded {human_size(uploaded['bytes_sent'])} over {uploaded['connections_total']} connections")

    serve_until_signalled(start, report, "seeder")  # close() in main() stops the seeder itself
    return 0


def run_pair(engine: ClientEngine, args: argparse.Namespace) -> int:
    server_identity = engine.pair(args.code)
    print(f"paired: this client {engine.identity.id} with the server {server_identity}")
    return 0


def run_token(engine: ClientEngine, args: argparse.Namespace) -> int:
    print(engine.web_token())  # alone on stdout, so that TOKEN=$(python client.py token) works
    return 0


def run_servers(args: argparse.Namespace) -> int:
    """Listen for servers' mDNS announcements and print what was heard (unverified hints)."""
    if not 0 < args.seconds <= MAX_LISTEN_S:
        print(f"error: --seconds must be more than 0 and at most {MAX_LISTEN_S:g}", file=sys.stderr)
        return 2
    print(f"listening {args.seconds:g} s for servers on the LAN...", file=sys.stderr, flush=True)
    try:
        found = browse(args.seconds)
    except OSError as error:  # no interface with multicast: configured addresses still work
        print(f"error: cannot listen for servers on this network: {error.strerror or error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([vars(server) for server in found], indent=2))
        return 0
    if not found:
        print("no servers heard (servers announce themselves only with 'discovery: true' in their config)")
        return 0
    print(f"{'ADDRESS':22}  {'ROLE':8}  {'EPOCH':>5}  IDENTITY")
    for server in found:
        print(f"{server.address:22}  {server.role:8}  {server.epoch:>5}  {server.identity}")
    return 0


COMMANDS = {"list": run_list, "get": run_get, "status": run_status, "seed": run_seed, "pair": run_pair,
            "token": run_token}
NEEDS_SERVER = {"list", "get", "status"}  # the seeder serves what it holds, with or without a server


def announce_wait(engine: ClientEngine) -> None:
    """If no server answers now, say on stderr what the command waits for and how long (it looks hung otherwise).

    Finding the active server is the command's own first step: when a server
    answers, the session it opened is reused, so this costs nothing.
    """
    try:
        engine.server.active_pool()
    except ConnectionFailed:  # the reason comes with the error if the wait ends in vain
        servers = " or ".join(f"{host}:{port}" for host, port in server_addresses(engine.config))
        print(f"waiting up to {engine.config.client.retry_deadline:g} s for a server at {servers} "
              "(none answers yet); Ctrl+C to stop", file=sys.stderr, flush=True)


def quiet_broken_pipe() -> int:
    """The reader of our output has gone (``| head -1``): drop what is left to print; status 0.

    Python would otherwise print a BrokenPipeError traceback when it flushes
    stdout at exit; pointing stdout at /dev/null makes that flush succeed.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def run_window(args: argparse.Namespace) -> int:
    """Open the client window (no command given); exit 2 with a one-line hint without a display."""
    try:
        config = load_config(args.config)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from minitorrent.gui.base import (  # tkinter only for the window
        NoDisplay,
        no_display_hint,
        open_root,
    )
    from minitorrent.gui.client_window import GEOMETRY, run
    from minitorrent.gui.shell import TITLES

    settings_file = config.client.data_dir / "window.json"
    try:
        root = open_root(TITLES["client"], args.geometry or GEOMETRY, settings_file)
    except NoDisplay:
        return no_display_hint("client.py", "list")
    try:
        setup_logging(config.logging, "client", console_level="WARNING")
        engine = ClientEngine(config)
    except MiniTorrentError as error:
        root.destroy()
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run(engine, root, settings_file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        return run_window(args)
    if args.command == "servers":  # needs no configured server: that is what it is for
        return run_servers(args)
    try:
        config = load_config(args.config)
        setup_logging(config.logging, "client", console_level="WARNING")
        engine = ClientEngine(config, on_progress=TerminalProgress() if args.command == "get" else None)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.command in NEEDS_SERVER:
            announce_wait(engine)
        status = COMMANDS[args.command](engine, args)
        sys.stdout.flush()  # here, not at exit, so a reader gone early is seen below
        return status
    except BrokenPipeError:
        return quiet_broken_pipe()
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
